/**
 * Test helper: free loopback TCP ports. Binds port 0 on 127.0.0.1, reads the port the kernel
 * chose and closes the socket again. A race with another process is possible, so callers that
 * hand the port to a child must retry when the child fails to bind.
 */
import net from 'node:net';

export async function freePort(): Promise<number> {
  return await new Promise<number>((resolve, reject) => {
    const server = net.createServer();
    server.unref();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const addr = server.address();
      if (addr === null || typeof addr === 'string') {
        server.close();
        reject(new Error('freePort: the kernel gave no TCP address for 127.0.0.1:0'));
        return;
      }
      const port = addr.port;
      server.close((err) => (err ? reject(err) : resolve(port)));
    });
  });
}

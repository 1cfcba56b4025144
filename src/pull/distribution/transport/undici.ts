/**
 * The parts of undici guestpull uses, loaded without the rest of the package. undici's index also
 * loads fetch, WebSocket, EventSource, the mocks and the caches: measured with require() on these
 * 2 cores, 152 ms for the index against 33 ms for these parts, most of a one-shot pull's start-up
 * that is not Node's own. What the index does for these parts is done here too: the request API
 * (`dispatcher.request`) mixed into Dispatcher.prototype. The types are undici's own.
 */
import { createRequire } from 'node:module';
import type * as Undici from 'undici';

const load = createRequire(import.meta.url);
const part = (p: string): unknown => load(`undici/lib/${p}.js`);

const DispatcherBase = part('dispatcher/dispatcher') as typeof Undici.Dispatcher;
Object.assign(DispatcherBase.prototype, part('api/index') as object);

export const Agent = part('dispatcher/agent') as typeof Undici.Agent;
export type Agent = Undici.Agent;
export const Pool = part('dispatcher/pool') as typeof Undici.Pool;
export type Pool = Undici.Pool;
export const ProxyAgent = part('dispatcher/proxy-agent') as typeof Undici.ProxyAgent;
export type ProxyAgent = Undici.ProxyAgent;
export const buildConnector = part('core/connect') as typeof Undici.buildConnector;
export type { buildConnector as BuildConnector, Dispatcher } from 'undici';

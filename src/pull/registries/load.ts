/**
 * The registry configuration in force: the inline `[image.registry_config]` table of cdh.toml, or
 * else the registries.conf file named by `[image] registry_configuration_uri` (`file:///…`; bounded,
 * TOML, the same subset and checks as the inline table). Inline wins when both are set. Loaded
 * once, when the Puller is created, so a bad file fails the daemon's start, not each pull.
 */
import { parse as parseToml, TomlError } from 'smol-toml';
import type { Config } from '../../config/index.js';
import { parseRegistriesConf, type RegistriesConf } from '../../config/registries.js';
import { ErrorCode, GuestpullError } from '../../errors.js';
import type { Logger } from '../../log.js';
import { readResource } from '../credentials/resource.js';

/** A registries.conf is a few KiB; refuse anything absurd before parsing it. */
export const MAX_REGISTRIES_CONF_BYTES = 1024 * 1024;

const URI_KEY = '[image] registry_configuration_uri';

export function emptyRegistriesConf(): RegistriesConf {
  return { unqualifiedSearchRegistries: [], registries: [] };
}

/** Parse a registries.conf text; `source` names it in messages. */
export function parseRegistriesConfText(text: string, source: string): RegistriesConf {
  let raw: unknown;
  try {
    raw = parseToml(text);
  } catch (e) {
    const where = e instanceof TomlError ? ` at line ${e.line}, column ${e.column}` : '';
    const first = (e instanceof Error ? e.message : String(e)).split('\n')[0] ?? '';
    throw new GuestpullError(ErrorCode.CONFIG, `invalid TOML in ${source}${where}: ${first}`, { source }, { cause: e });
  }
  return parseRegistriesConf(raw, source);
}

export function loadRegistryConfiguration(image: Config['image'], logger: Logger): RegistriesConf {
  const uri = image.registryConfigurationUri;
  const hasUri = uri !== undefined && uri !== '';
  if (image.registryConfig !== undefined) {
    if (hasUri) logger.info({ uri }, `${URI_KEY} is ignored: the inline [image.registry_config] takes precedence`);
    return image.registryConfig;
  }
  if (!hasUri) return emptyRegistriesConf();
  const r = readResource({
    uri,
    key: URI_KEY,
    maxBytes: MAX_REGISTRIES_CONF_BYTES,
    kbsAdvice: 'put the registry configuration inline in cdh.toml ([image.registry_config])',
  });
  const conf = parseRegistriesConfText(r.text, r.file);
  logger.info({ file: r.file, rules: conf.registries.length, unqualifiedSearch: conf.unqualifiedSearchRegistries }, 'registry configuration loaded');
  return conf;
}

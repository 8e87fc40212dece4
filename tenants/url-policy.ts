/**
 * Which URLs the control plane accepts for outbound fetches (JWKS, jku) and for FHIR servers.
 * The service only ever fetches URLs an operator registered; these checks keep the
 * registrations themselves sane (no plaintext http off-box, no credentials in URLs).
 */

const LOOPBACK_HOSTS = new Set(['127.0.0.1', 'localhost']);

/** Parses an absolute URL, or returns undefined. */
export function parseAbsoluteUrl(value: unknown): URL | undefined {
  if (typeof value !== 'string' || value.length === 0 || value.length > 2048) {
    return undefined;
  }
  try {
    return new URL(value);
  } catch {
    return undefined;
  }
}

/**
 * Why a URL may not be fetched for keys, or undefined if it may: absolute https, or http only
 * to 127.0.0.1/localhost (local development and specs); no userinfo, no fragment.
 */
export function keyUrlProblem(value: unknown): string | undefined {
  const url = parseAbsoluteUrl(value);
  if (!url) {
    return 'must be an absolute URL';
  }
  if (url.username !== '' || url.password !== '') {
    return 'must not contain credentials';
  }
  if (url.hash !== '') {
    return 'must not contain a fragment';
  }
  if (url.protocol === 'https:') {
    return undefined;
  }
  if (url.protocol === 'http:' && LOOPBACK_HOSTS.has(url.hostname)) {
    return undefined;
  }
  return 'must be https (http only for 127.0.0.1 or localhost)';
}

/** Why a FHIR server base URL is not acceptable, or undefined: absolute http(s), no credentials. */
export function fhirServerUrlProblem(value: unknown): string | undefined {
  const url = parseAbsoluteUrl(value);
  if (!url || (url.protocol !== 'https:' && url.protocol !== 'http:')) {
    return 'must be an absolute http(s) URL';
  }
  if (url.username !== '' || url.password !== '') {
    return 'must not contain credentials';
  }
  if (url.hash !== '' || url.search !== '') {
    return 'must be a base URL without query or fragment';
  }
  return undefined;
}

/**
 * FHIR server base URLs: the normal form used to compare a request's `fhirServer` with a
 * tenant's allowlist, and the "stays under this base" test for every URL we fetch.
 */

/**
 * Normal form of a FHIR base URL: scheme + host + port (default port dropped) + path, no
 * trailing slash, no userinfo, no query, no fragment. Host is lower-cased by URL parsing.
 * @returns the normal form, or undefined if `value` is not an absolute http(s) URL.
 */
export function normalizeFhirBaseUrl(value: string): string | undefined {
  let url: URL;
  try {
    url = new URL(value);
  } catch {
    return undefined;
  }
  if (url.protocol !== 'https:' && url.protocol !== 'http:') {
    return undefined;
  }
  const path = url.pathname.replace(/\/+$/, '');
  return `${url.protocol}//${url.host}${path}`;
}

/**
 * True if `url` is an http(s) URL without userinfo whose scheme, host and port equal the
 * normalised `base` and whose path is the base path or below it (`{base}/...`, `{base}?...`).
 */
export function isUnderFhirBase(url: URL, base: string): boolean {
  if (url.username !== '' || url.password !== '') {
    return false;
  }
  const baseUrl = new URL(base);
  if (url.protocol !== baseUrl.protocol || url.host !== baseUrl.host) {
    return false;
  }
  const basePath = baseUrl.pathname.replace(/\/+$/, '');
  return (
    url.pathname === basePath ||
    url.pathname === `${basePath}/` ||
    url.pathname.startsWith(`${basePath}/`)
  );
}

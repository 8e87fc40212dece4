/**
 * Prefetch resolution (CDS Hooks 2.0 §Prefetch): use what the EHR sent, fetch what is
 * missing from its FHIR server, and only from a server on the tenant's allowlist.
 *
 * Safety rules kept here: every check that could refuse a call runs before the first
 * request, so a refused call makes no outbound request at all; redirects are never followed;
 * each request has a timeout and a body size cap enforced while streaming; `next` links are
 * followed only below the same base and at most `maxPages` pages per key; the access token
 * goes only into the `Authorization` header, never into an error, a log or the result.
 */
import { renderPrefetchTemplateOrGap } from '../rules/index.ts';
import { PrefetchError } from './errors.ts';
import { isUnderFhirBase, normalizeFhirBaseUrl } from './fhir-base-url.ts';
import type {
  HookRequest,
  PrefetchFetchOptions,
  PrefetchObserver,
  PrefetchResult,
  PrefetchSource,
} from './types.ts';
import { isJsonObject } from './validation.ts';

/** Inputs of {@link resolvePrefetch}. */
export interface ResolvePrefetchOptions {
  /** The service's prefetch templates (key -> relative FHIR URL); undefined = none. */
  templates: Record<string, string> | undefined;
  /** The validated hook request (context, prefetch, fhirServer, fhirAuthorization). */
  request: HookRequest;
  /** The tenant's allowed FHIR server base URLs (compared in normal form). */
  allowedFhirServers: readonly string[];
  fetchOptions: PrefetchFetchOptions;
  observer?: PrefetchObserver;
  /** For tests; defaults to the global fetch. */
  fetchImpl?: typeof fetch;
}

type FetchOutcome = Parameters<NonNullable<PrefetchObserver['onFetch']>>[0];

/** Where and how to fetch, once the call passed every check. Holds the token: never log it. */
interface Connection {
  base: string;
  headers: Record<string, string>;
}

type Plan =
  | { key: string; kind: 'value'; value: unknown; source: 'sent' | 'not-applicable' }
  | { key: string; kind: 'fetch'; url: URL; connection: Connection }
  | {
      key: string;
      kind: 'pages';
      first: Record<string, unknown>;
      next: URL;
      connection: Connection;
    };

function isOperationOutcome(value: unknown): boolean {
  return isJsonObject(value) && value['resourceType'] === 'OperationOutcome';
}

function isBundle(value: unknown): value is Record<string, unknown> {
  return isJsonObject(value) && value['resourceType'] === 'Bundle';
}

function isSearchset(value: unknown): value is Record<string, unknown> {
  return isBundle(value) && value['type'] === 'searchset';
}

/** The raw `next` link of a Bundle, if any. */
function nextLinkOf(bundle: Record<string, unknown>): string | undefined {
  const links = bundle['link'];
  if (!Array.isArray(links)) {
    return undefined;
  }
  for (const link of links as unknown[]) {
    if (isJsonObject(link) && link['relation'] === 'next' && typeof link['url'] === 'string') {
      return link['url'];
    }
  }
  return undefined;
}

function notify(observer: PrefetchObserver | undefined, outcome: FetchOutcome, key: string): void {
  try {
    observer?.onFetch?.(outcome, key);
  } catch {
    // Metrics must never change the outcome of a hook call.
  }
}

/**
 * Resolves every prefetch key of a service for one hook call.
 *
 * Per template key: a value sent by the EHR is used (`null` is kept: no data); an
 * OperationOutcome value is a failure and is refetched when possible; a searchset Bundle
 * with a `next` link has its further pages fetched. A missing (or OperationOutcome) key whose
 * template has a token that is not in this call's context at all (`{{context.encounterId}}`
 * without an encounter; a user token for another kind of user) is `null`, source
 * `not-applicable`: the query does not apply. Any other missing key has its template rendered
 * from the context and is fetched as `GET {fhirServer}/{url}` with
 * `Authorization: Bearer {access_token}` and `Accept: application/fhir+json`, only when both
 * `fhirServer` and `fhirAuthorization` were sent and `fhirServer` (normalised) is one of
 * `allowedFhirServers`. Fetches of one call run in parallel; the first failure aborts the rest.
 * Pages of one key are merged into one searchset Bundle; when more than `maxPages` pages
 * exist, the first `maxPages` are kept and the merged Bundle keeps the remaining `next` link.
 * @throws PrefetchError (HTTP 412, `operationOutcome` as body) with reason `missing` (no
 *   fhirServer / fhirAuthorization, or a token whose value cannot go into a URL), `not-allowed`
 *   (server or `next` link outside the allowlist), `timeout`, `too-large`, `failed` (network,
 *   HTTP error, redirect, not JSON) or `operation-outcome`.
 */
export async function resolvePrefetch(opts: ResolvePrefetchOptions): Promise<PrefetchResult> {
  const templates = opts.templates ?? {};
  const sent = opts.request.prefetch ?? {};
  const limits: PrefetchFetchOptions = {
    timeoutMs: Math.max(1, opts.fetchOptions.timeoutMs),
    maxBytes: Math.max(1, opts.fetchOptions.maxBytes),
    maxPages: Math.max(1, Math.floor(opts.fetchOptions.maxPages)),
  };

  // 1. Plan every key, synchronously: any refusal happens before the first request.
  const plans: Plan[] = [];
  for (const [key, template] of Object.entries(templates)) {
    try {
      plans.push(planKey(key, template, sent, opts, limits));
    } catch (error) {
      notify(opts.observer, 'refused', key);
      throw error;
    }
  }

  // 2. Run the fetches in parallel; the first failure aborts the others.
  const group = new AbortController();
  const fetchImpl = opts.fetchImpl ?? fetch;
  let settled: Array<[string, unknown, PrefetchSource]>;
  try {
    settled = await Promise.all(
      plans.map(async (plan): Promise<[string, unknown, PrefetchSource]> => {
        if (plan.kind === 'value') {
          return [plan.key, plan.value, plan.source];
        }
        try {
          const value =
            plan.kind === 'fetch'
              ? await fetchResource(
                  plan.key,
                  plan.url,
                  plan.connection,
                  limits,
                  fetchImpl,
                  group.signal,
                )
              : await fetchPages(
                  plan.key,
                  plan.first,
                  plan.next,
                  plan.connection,
                  limits,
                  fetchImpl,
                  group.signal,
                );
          notify(opts.observer, 'ok', plan.key);
          return [plan.key, value, 'fetched'];
        } catch (error) {
          if (!group.signal.aborted) {
            notify(
              opts.observer,
              error instanceof PrefetchError && error.reason === 'timeout' ? 'timeout' : 'error',
              plan.key,
            );
          }
          throw error;
        }
      }),
    );
  } catch (error) {
    group.abort();
    throw error;
  }

  // Object.fromEntries defines own properties: a key named `__proto__` stays a plain key.
  return {
    prefetch: Object.fromEntries(settled.map(([key, value]) => [key, value])),
    sources: Object.fromEntries(settled.map(([key, , source]) => [key, source])),
  };
}

function planKey(
  key: string,
  template: string,
  sent: Record<string, unknown>,
  opts: ResolvePrefetchOptions,
  limits: PrefetchFetchOptions,
): Plan {
  let failure: 'missing' | 'operation-outcome' = 'missing';
  if (Object.hasOwn(sent, key)) {
    const value = sent[key];
    if (isOperationOutcome(value)) {
      failure = 'operation-outcome';
    } else if (isSearchset(value) && nextLinkOf(value) !== undefined && limits.maxPages > 1) {
      const connection = connect(key, 'missing', opts, 'more-pages');
      return {
        key,
        kind: 'pages',
        first: value,
        next: resolveNext(key, value, connection),
        connection,
      };
    } else {
      return { key, kind: 'value', value: value ?? null, source: 'sent' };
    }
  }
  const rendered = renderPrefetchTemplateOrGap(template, opts.request.context);
  if ('gap' in rendered) {
    if (rendered.gap === 'absent') {
      // The query does not apply to this call (e.g. `Encounter/{{context.encounterId}}` when
      // the chart was opened outside an encounter, or a PractitionerRole token for a
      // Practitioner user): the EHR could not run it either, and there is no data for it.
      return { key, kind: 'value', value: null, source: 'not-applicable' };
    }
    throw new PrefetchError(
      key,
      failure,
      `prefetch '${key}': a template token has no usable value in this context`,
    );
  }
  const connection = connect(key, failure, opts);
  let url: URL;
  try {
    url = new URL(`${connection.base}/${rendered.url.replace(/^\/+/, '')}`);
  } catch {
    throw new PrefetchError(
      key,
      'failed',
      `prefetch '${key}': the rendered template is not a valid URL`,
    );
  }
  if (!isUnderFhirBase(url, connection.base)) {
    throw new PrefetchError(
      key,
      'not-allowed',
      `prefetch '${key}': the rendered template leaves the FHIR server`,
    );
  }
  return { key, kind: 'fetch', url, connection };
}

/**
 * Checks that this call may fetch at all; the reason of a refusal depends on why we fetch:
 * `want` is `absent` for a key to fetch whole (not sent, or sent as an OperationOutcome) and
 * `more-pages` for the further pages of a searchset the EHR sent with a `next` link.
 */
function connect(
  key: string,
  failure: 'missing' | 'operation-outcome',
  opts: ResolvePrefetchOptions,
  want: 'absent' | 'more-pages' = 'absent',
): Connection {
  const { fhirServer, fhirAuthorization } = opts.request;
  if (want === 'more-pages' && (fhirServer === undefined || fhirAuthorization === undefined)) {
    // The EHR did send the key: saying it is "not available" sent integrators looking for a
    // prefetch they had sent. What is missing is the way to fetch its other pages.
    throw new PrefetchError(
      key,
      failure,
      `prefetch '${key}' was sent, but its searchset Bundle has more pages (a next link) that cannot be fetched without fhirServer and fhirAuthorization`,
    );
  }
  if (fhirServer === undefined) {
    throw new PrefetchError(
      key,
      failure,
      `prefetch '${key}' is not available and no fhirServer was sent`,
    );
  }
  if (fhirAuthorization === undefined) {
    throw new PrefetchError(
      key,
      failure,
      `prefetch '${key}' is not available and no fhirAuthorization was sent`,
    );
  }
  // A token restricted to one patient (SMART patient/ scopes) names it: if that is not the
  // hook's patient, the EHR sent someone else's access. Nothing is fetched with it (the id is
  // not quoted: the message reaches logs and the EHR).
  const contextPatient = (opts.request.context as { patientId?: unknown }).patientId;
  if (
    fhirAuthorization.patient !== undefined &&
    typeof contextPatient === 'string' &&
    fhirAuthorization.patient !== contextPatient
  ) {
    throw new PrefetchError(
      key,
      'not-allowed',
      `prefetch '${key}': the fhirAuthorization was granted for another patient than context.patientId`,
    );
  }
  const base = normalizeFhirBaseUrl(fhirServer);
  const allowed = new Set(
    opts.allowedFhirServers.map(normalizeFhirBaseUrl).filter((v): v is string => v !== undefined),
  );
  if (base === undefined || !allowed.has(base)) {
    throw new PrefetchError(
      key,
      'not-allowed',
      `prefetch '${key}': the fhirServer is not allowed for this tenant`,
    );
  }
  return {
    base,
    headers: {
      Authorization: `Bearer ${fhirAuthorization.access_token}`,
      Accept: 'application/fhir+json',
    },
  };
}

function resolveNext(key: string, bundle: Record<string, unknown>, connection: Connection): URL {
  const raw = nextLinkOf(bundle);
  let url: URL | undefined;
  try {
    url = raw === undefined ? undefined : new URL(raw, `${connection.base}/`);
  } catch {
    url = undefined;
  }
  if (url === undefined) {
    throw new PrefetchError(key, 'failed', `prefetch '${key}': the next link is not a valid URL`);
  }
  if (!isUnderFhirBase(url, connection.base)) {
    throw new PrefetchError(
      key,
      'not-allowed',
      `prefetch '${key}': a next link leaves the FHIR server`,
    );
  }
  return url;
}

/** Fetches a read or the first page of a search, then the further pages of a searchset. */
async function fetchResource(
  key: string,
  url: URL,
  connection: Connection,
  limits: PrefetchFetchOptions,
  fetchImpl: typeof fetch,
  signal: AbortSignal,
): Promise<Record<string, unknown>> {
  const first = await fetchJson(key, url, connection, limits, fetchImpl, signal);
  if (isSearchset(first) && nextLinkOf(first) !== undefined && limits.maxPages > 1) {
    return fetchPages(
      key,
      first,
      resolveNext(key, first, connection),
      connection,
      limits,
      fetchImpl,
      signal,
    );
  }
  return first;
}

async function fetchPages(
  key: string,
  first: Record<string, unknown>,
  firstNext: URL,
  connection: Connection,
  limits: PrefetchFetchOptions,
  fetchImpl: typeof fetch,
  signal: AbortSignal,
): Promise<Record<string, unknown>> {
  const pages: Array<Record<string, unknown>> = [first];
  let next: URL | undefined = firstNext;
  let remaining: string | undefined;
  while (next !== undefined) {
    const page = await fetchJson(key, next, connection, limits, fetchImpl, signal);
    if (!isBundle(page)) {
      throw new PrefetchError(key, 'failed', `prefetch '${key}': a next page is not a Bundle`);
    }
    pages.push(page);
    remaining = nextLinkOf(page);
    next =
      remaining !== undefined && pages.length < limits.maxPages
        ? resolveNext(key, page, connection)
        : undefined;
  }
  const entries = pages.flatMap((page) =>
    Array.isArray(page['entry']) ? (page['entry'] as unknown[]) : [],
  );
  const total = first['total'];
  return {
    resourceType: 'Bundle',
    type: 'searchset',
    ...(typeof total === 'number' ? { total } : {}),
    // A remaining `next` link tells the rules the result was cut at maxPages.
    ...(remaining === undefined ? {} : { link: [{ relation: 'next', url: remaining }] }),
    ...(entries.length > 0 ? { entry: entries } : {}),
  };
}

/** One GET: no redirects, timeout, streamed size cap, JSON FHIR resource expected. */
async function fetchJson(
  key: string,
  url: URL,
  connection: Connection,
  limits: PrefetchFetchOptions,
  fetchImpl: typeof fetch,
  group: AbortSignal,
): Promise<Record<string, unknown>> {
  if (group.aborted) {
    throw new PrefetchError(key, 'failed', `prefetch '${key}': cancelled`);
  }
  const controller = new AbortController();
  // An object, not a local boolean: the timer callback sets it while we await.
  const state = { timedOut: false };
  const timer = setTimeout(() => {
    state.timedOut = true;
    controller.abort();
  }, limits.timeoutMs);
  const onGroupAbort = (): void => {
    controller.abort();
  };
  group.addEventListener('abort', onGroupAbort, { once: true });
  const timeoutError = (): PrefetchError =>
    new PrefetchError(
      key,
      'timeout',
      `prefetch '${key}': the FHIR server did not answer within ${limits.timeoutMs} ms`,
    );
  try {
    let response: Response;
    try {
      response = await fetchImpl(url, {
        method: 'GET',
        headers: connection.headers,
        redirect: 'manual',
        signal: controller.signal,
      });
    } catch {
      // The underlying error is dropped on purpose: it may carry request details.
      throw state.timedOut
        ? timeoutError()
        : new PrefetchError(
            key,
            'failed',
            `prefetch '${key}': the FHIR server could not be reached`,
          );
    }
    if (response.type === 'opaqueredirect' || (response.status >= 300 && response.status < 400)) {
      await discardBody(response);
      throw new PrefetchError(
        key,
        'failed',
        `prefetch '${key}': the FHIR server answered with a redirect, which is not followed`,
      );
    }
    if (!response.ok) {
      await discardBody(response);
      throw new PrefetchError(
        key,
        'failed',
        `prefetch '${key}': the FHIR server answered HTTP ${response.status}`,
      );
    }
    let text: string;
    try {
      text = await readCapped(key, response, limits.maxBytes, controller);
    } catch (error) {
      if (error instanceof PrefetchError) {
        throw error;
      }
      throw state.timedOut
        ? timeoutError()
        : new PrefetchError(key, 'failed', `prefetch '${key}': the response could not be read`);
    }
    let parsed: unknown;
    try {
      parsed = JSON.parse(text);
    } catch {
      throw new PrefetchError(key, 'failed', `prefetch '${key}': the response is not JSON`);
    }
    if (!isJsonObject(parsed) || typeof parsed['resourceType'] !== 'string') {
      throw new PrefetchError(
        key,
        'failed',
        `prefetch '${key}': the response is not a FHIR resource`,
      );
    }
    if (parsed['resourceType'] === 'OperationOutcome') {
      throw new PrefetchError(
        key,
        'operation-outcome',
        `prefetch '${key}': the FHIR server answered with an OperationOutcome`,
      );
    }
    return parsed;
  } finally {
    clearTimeout(timer);
    group.removeEventListener('abort', onGroupAbort);
  }
}

async function discardBody(response: Response): Promise<void> {
  try {
    await response.body?.cancel();
  } catch {
    // Nothing to free.
  }
}

async function readCapped(
  key: string,
  response: Response,
  maxBytes: number,
  controller: AbortController,
): Promise<string> {
  const tooLarge = (): PrefetchError =>
    new PrefetchError(
      key,
      'too-large',
      `prefetch '${key}': the response is larger than ${maxBytes} bytes`,
    );
  const declared = Number(response.headers.get('content-length') ?? Number.NaN);
  if (Number.isFinite(declared) && declared > maxBytes) {
    controller.abort();
    throw tooLarge();
  }
  if (response.body === null) {
    return '';
  }
  const reader = (response.body as ReadableStream<Uint8Array>).getReader();
  const chunks: Uint8Array[] = [];
  let total = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) {
      break;
    }
    total += value.byteLength;
    if (total > maxBytes) {
      controller.abort();
      await reader.cancel().catch(() => undefined);
      throw tooLarge();
    }
    chunks.push(value);
  }
  return new TextDecoder('utf-8', { fatal: true }).decode(Buffer.concat(chunks));
}

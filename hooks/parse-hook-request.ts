/**
 * Parsing a CDS Hooks 2.0 service request (`POST /cds-services/{id}`) into a HookRequest.
 */
import { z } from 'zod';
import { HookRequestError } from './errors.ts';
import { isHookName, parseHookContext } from './hook-contexts.ts';
import type { FhirAuthorization, HookName, HookRequest } from './types.ts';
import { assertSafeJsonKeys, formatField, isJsonObject, parseWithSchema } from './validation.ts';

/** 8-4-4-4-12 hex digits, no `urn:uuid:` prefix (any version: the spec only says UUID). */
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

const fhirAuthorizationSchema = z.looseObject({
  access_token: z.string().min(1, { error: 'must not be empty' }),
  token_type: z.literal('Bearer', { error: "must be 'Bearer'" }),
  expires_in: z
    .number()
    .int({ error: 'must be an integer' })
    .min(0, { error: 'must not be negative' }),
  scope: z.string().min(1, { error: 'must not be empty' }),
  subject: z.string().min(1, { error: 'must not be empty' }),
  patient: z.string().min(1, { error: 'must not be empty' }).optional(),
});

/** A prefetch value that is not `null` must at least look like a FHIR resource. */
const prefetchResourceSchema = z.looseObject({
  resourceType: z.string().regex(/^[A-Z][A-Za-z]{0,63}$/, { error: 'must be a FHIR resource' }),
});

/**
 * Checks that `value` is an absolute http(s) base URL without credentials, query or fragment.
 * @returns the problem, or undefined when it is acceptable.
 */
function fhirServerProblem(value: string): string | undefined {
  let url: URL;
  try {
    url = new URL(value);
  } catch {
    return 'must be an absolute http(s) URL';
  }
  if (url.protocol !== 'https:' && url.protocol !== 'http:') {
    return 'must be an absolute http(s) URL';
  }
  if (url.username !== '' || url.password !== '' || url.search !== '' || url.hash !== '') {
    return 'must be a base URL without credentials, query or fragment';
  }
  return undefined;
}

function optionalObject(
  body: Record<string, unknown>,
  field: string,
): Record<string, unknown> | undefined {
  const value = body[field];
  if (value === undefined) {
    return undefined;
  }
  if (!isJsonObject(value)) {
    throw new HookRequestError(field, 'must be an object');
  }
  return value;
}

function parsePrefetch(
  value: Record<string, unknown>,
  keys: readonly string[] | undefined,
): Record<string, unknown> {
  const entries: Array<[string, unknown]> = [];
  for (const [key, item] of Object.entries(value)) {
    if (keys !== undefined && !keys.includes(key)) {
      continue;
    }
    if (item !== null) {
      if (!isJsonObject(item)) {
        throw new HookRequestError(
          formatField('prefetch', [key]),
          'must be a FHIR resource or null',
        );
      }
      parseWithSchema(prefetchResourceSchema, item, formatField('prefetch', [key]));
    }
    entries.push([key, item]);
  }
  // Object.fromEntries defines own properties, so no key can reach a prototype.
  return Object.fromEntries(entries);
}

/**
 * Validates a CDS Hooks 2.0 request body for a service whose hook is `expectedHook`:
 * `hook` equal to it, `hookInstance` a UUID, `fhirServer` an absolute http(s) base URL
 * (required when `fhirAuthorization` is present), `fhirAuthorization` complete with
 * `token_type` Bearer, `context` valid for the hook, `prefetch` an object of FHIR resources
 * or `null`, `extension` an object. Unknown top-level fields are tolerated and dropped.
 * Bodies with `__proto__`/`constructor`/`prototype` keys anywhere are refused. With
 * `prefetchKeys` (the keys the service's discovery declares), other prefetch keys are dropped
 * unchecked: data the service never asked for neither fails the call nor reaches the rules or
 * the stored record.
 * @throws HookRequestError naming the field (`hook`, `hookInstance`, `fhirServer`,
 *   `fhirAuthorization.token_type`, `context.userId`, `context.selections[1]`, `prefetch.x`...).
 * @throws Error if `expectedHook` is not one of HOOK_NAMES (a bug in the caller).
 */
export function parseHookRequest(
  body: unknown,
  expectedHook: HookName,
  opts: { prefetchKeys?: readonly string[] } = {},
): HookRequest {
  if (!isHookName(expectedHook)) {
    // The service's own hook is not one we serve: a catalog bug, not a bad request.
    throw new Error('parseHookRequest: the service hook is not a known hook');
  }
  if (!isJsonObject(body)) {
    throw new HookRequestError('body', 'must be a JSON object');
  }
  assertSafeJsonKeys(body);

  const hook = body['hook'];
  if (typeof hook !== 'string' || hook === '') {
    throw new HookRequestError('hook', 'is required');
  }
  if (hook !== expectedHook) {
    throw new HookRequestError('hook', `must be '${expectedHook}' for this service`);
  }

  const hookInstance = body['hookInstance'];
  if (typeof hookInstance !== 'string' || hookInstance === '') {
    throw new HookRequestError('hookInstance', 'is required');
  }
  if (!UUID.test(hookInstance)) {
    throw new HookRequestError('hookInstance', 'must be a UUID');
  }

  const fhirServer = body['fhirServer'];
  if (fhirServer !== undefined) {
    if (typeof fhirServer !== 'string') {
      throw new HookRequestError('fhirServer', 'must be a string');
    }
    const problem = fhirServerProblem(fhirServer);
    if (problem !== undefined) {
      throw new HookRequestError('fhirServer', problem);
    }
  }

  let fhirAuthorization: FhirAuthorization | undefined;
  const rawAuthorization = optionalObject(body, 'fhirAuthorization');
  if (rawAuthorization !== undefined) {
    if (fhirServer === undefined) {
      throw new HookRequestError('fhirServer', 'is required when fhirAuthorization is present');
    }
    const parsed = parseWithSchema(fhirAuthorizationSchema, rawAuthorization, 'fhirAuthorization');
    fhirAuthorization = {
      access_token: parsed.access_token,
      token_type: parsed.token_type,
      expires_in: parsed.expires_in,
      scope: parsed.scope,
      subject: parsed.subject,
      ...(parsed.patient === undefined ? {} : { patient: parsed.patient }),
    };
  }

  const rawContext = body['context'];
  if (rawContext === undefined) {
    throw new HookRequestError('context', 'is required');
  }
  if (!isJsonObject(rawContext)) {
    throw new HookRequestError('context', 'must be an object');
  }
  const context = parseHookContext(expectedHook, rawContext);

  const rawPrefetch = optionalObject(body, 'prefetch');
  const extension = optionalObject(body, 'extension');

  return {
    hook: expectedHook,
    hookInstance,
    ...(fhirServer === undefined ? {} : { fhirServer }),
    ...(fhirAuthorization === undefined ? {} : { fhirAuthorization }),
    context,
    ...(rawPrefetch === undefined
      ? {}
      : { prefetch: parsePrefetch(rawPrefetch, opts.prefetchKeys) }),
    ...(extension === undefined ? {} : { extension }),
  };
}

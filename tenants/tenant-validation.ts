/**
 * Validation of control-plane input (tenants, issuers, subscriptions). Every problem is an
 * InvalidInputError naming the exact field (`issuers[1].jwks.keys[0]`). Input is treated as
 * untrusted JSON: unknown fields (including `__proto__`) are errors, not silently dropped.
 */
import nodeJose from 'node-jose';
import semver from 'semver';
import type { Subscription } from '../rules/index.ts';
import { InvalidInputError } from './errors.ts';
import type {
  DrRule,
  Jwks,
  NewTenant,
  ResidencyPolicyInput,
  TenantPatch,
  TenantRetention,
  TenantSmart,
  TenantStatus,
  TrustedIssuer,
} from './types.ts';
import { fhirServerUrlProblem, keyUrlProblem, parseAbsoluteUrl } from './url-policy.ts';

/** Tenant ids: lowercase, digits and dashes, 2..63 characters. */
export const TENANT_ID_PATTERN = /^[a-z0-9][a-z0-9-]{1,62}$/;
const REGION_PATTERN = /^[a-z0-9][a-z0-9-]{0,62}$/;
const PRIVATE_JWK_MEMBERS = ['d', 'p', 'q', 'dp', 'dq', 'qi', 'k', 'oth'] as const;
const SIGNING_ALGS = new Set([
  'RS256',
  'RS384',
  'RS512',
  'PS256',
  'PS384',
  'PS512',
  'ES256',
  'ES384',
  'ES512',
]);
const EC_CURVES = new Set(['P-256', 'P-384', 'P-521']);
const MIN_RSA_BITS = 2048;
const MAX_KEYS = 50;
const MAX_ISSUERS = 50;
const MAX_LIST = 100;
/** The most subscriptions a tenant may have (checked before anything reads the catalog). */
export const MAX_SUBSCRIPTIONS = MAX_LIST;
/**
 * The largest canary share (%), on every write path (admin API, CLI, a direct control-plane
 * write). A canary tries a version on a share of a tenant's calls beside the pinned version; at
 * 100 % it is a full rollout that skips the pin step (and above half it serves most calls while
 * still called a trial). To send a version every call, pin it. server/admin-service.ts refuses
 * it first, with this message, before the catalog is read.
 */
export const MAX_CANARY_PERCENT = 50;

/** Why a canary percent over {@link MAX_CANARY_PERCENT} is refused, and what to do instead. */
export function canaryPercentMessage(version: unknown): string {
  const v = typeof version === 'string' && version !== '' ? version : 'the canary version';
  return (
    `must be at most ${MAX_CANARY_PERCENT}: a canary tries a version on a share of the calls; ` +
    `to give ${v} every call, pin it instead (version ${v}, no canary: pack rollout PACK --version ${v})`
  );
}

/**
 * Refuses a canary (`{ version, percent }`) whose percent is a number over
 * {@link MAX_CANARY_PERCENT}, naming `field`; any other shape is left to the caller's checks.
 * The admin service calls it before the catalog is read, the subscription validation on every
 * write path.
 * @throws InvalidInputError (`field`) with {@link canaryPercentMessage}.
 */
export function assertCanaryPercentAllowed(canary: unknown, field: string): void {
  if (
    isObject(canary) &&
    typeof canary.percent === 'number' &&
    canary.percent > MAX_CANARY_PERCENT
  ) {
    throw new InvalidInputError(field, canaryPercentMessage(canary.version));
  }
}
const MAX_NAME = 200;
const MAX_REGIONS = 32;
/**
 * An OAuth client_id (RFC 6749 §A.1 allows any VSCHAR): visible ASCII without spaces, so it
 * travels unchanged through the authorization URL, JSON and logs. EHRs assign UUIDs, opaque
 * strings or URLs; 255 characters is well above any of them.
 */
const SMART_CLIENT_ID_PATTERN = /^[\x21-\x7e]{1,255}$/;

type Json = Record<string, unknown>;

function isObject(value: unknown): value is Json {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function requireObject(value: unknown, field: string): Json {
  if (!isObject(value)) {
    throw new InvalidInputError(field, 'must be an object');
  }
  return value;
}

function rejectUnknown(obj: Json, allowed: readonly string[], prefix: string): void {
  for (const key of Object.keys(obj)) {
    if (!allowed.includes(key)) {
      throw new InvalidInputError(
        prefix ? `${prefix}.${key.slice(0, 64)}` : key.slice(0, 64),
        'is not a known field',
      );
    }
  }
}

function requireArray(value: unknown, field: string, max: number): unknown[] {
  if (!Array.isArray(value)) {
    throw new InvalidInputError(field, 'must be an array');
  }
  if (value.length > max) {
    throw new InvalidInputError(field, `must have at most ${max} entries`);
  }
  return value;
}

/** @throws InvalidInputError (`id`) unless the id matches TENANT_ID_PATTERN. */
export function validateTenantId(id: unknown, field = 'id'): string {
  if (typeof id !== 'string' || !TENANT_ID_PATTERN.test(id)) {
    throw new InvalidInputError(field, 'must match ^[a-z0-9][a-z0-9-]{1,62}$');
  }
  return id;
}

function validateName(value: unknown): string {
  if (typeof value !== 'string' || value.trim().length === 0 || value.length > MAX_NAME) {
    throw new InvalidInputError(
      'name',
      `must be a non-empty string of at most ${MAX_NAME} characters`,
    );
  }
  return value;
}

/** @throws InvalidInputError (`field`) unless `value` is a region id. */
export function validateRegion(value: unknown, field = 'region'): string {
  if (typeof value !== 'string' || !REGION_PATTERN.test(value)) {
    throw new InvalidInputError(field, 'must be a region id (^[a-z0-9][a-z0-9-]{0,62}$)');
  }
  return value;
}

function validateRegionList(value: unknown, field: string): string[] {
  const list = requireArray(value, field, MAX_REGIONS);
  if (list.length === 0) {
    throw new InvalidInputError(field, 'must name at least one region');
  }
  const out: string[] = [];
  for (const [i, entry] of list.entries()) {
    const id = validateRegion(entry, `${field}[${i}]`);
    if (out.includes(id)) {
      throw new InvalidInputError(`${field}[${i}]`, 'is listed twice');
    }
    out.push(id);
  }
  return out;
}

function validateDrRule(value: unknown, field: string): DrRule {
  const raw = requireObject(value, field);
  switch (raw.mode) {
    case 'none':
    case 'jurisdiction':
      rejectUnknown(raw, ['mode'], field);
      return { mode: raw.mode };
    case 'regions':
      rejectUnknown(raw, ['mode', 'regions'], field);
      return { mode: 'regions', regions: validateRegionList(raw.regions, `${field}.regions`) };
    default:
      throw new InvalidInputError(`${field}.mode`, "must be 'none', 'jurisdiction' or 'regions'");
  }
}

/**
 * Validates the shape of a residency policy (not whether it permits the placement: that is
 * `checkPlacement` in residency.ts).
 * @throws InvalidInputError naming the field (`residency.dr.regions[1]`).
 */
export function validateResidencyPolicy(value: unknown, field = 'residency'): ResidencyPolicyInput {
  const raw = requireObject(value, field);
  rejectUnknown(raw, ['processingRegions', 'backupRegions', 'dr'], field);
  const policy: ResidencyPolicyInput = {};
  if (raw.processingRegions !== undefined) {
    policy.processingRegions = validateRegionList(
      raw.processingRegions,
      `${field}.processingRegions`,
    );
  }
  if (raw.backupRegions !== undefined) {
    policy.backupRegions = validateRegionList(raw.backupRegions, `${field}.backupRegions`);
  }
  if (raw.dr !== undefined) {
    policy.dr = validateDrRule(raw.dr, `${field}.dr`);
  }
  return policy;
}

function validateStatus(value: unknown): TenantStatus {
  if (value !== 'active' && value !== 'suspended') {
    throw new InvalidInputError('status', "must be 'active' or 'suspended'");
  }
  return value;
}

function validateFhirServers(value: unknown): string[] {
  const list = requireArray(value, 'fhirServers', MAX_LIST);
  return list.map((entry, i) => {
    const problem = fhirServerUrlProblem(entry);
    if (problem) {
      throw new InvalidInputError(`fhirServers[${i}]`, problem);
    }
    return entry as string;
  });
}

/**
 * Validates a tenant's SMART registration (`{ clientId }`).
 * @throws InvalidInputError naming the field (`smart.clientId`).
 */
export function validateTenantSmart(value: unknown, field = 'smart'): TenantSmart {
  const raw = requireObject(value, field);
  rejectUnknown(raw, ['clientId'], field);
  const clientId = raw.clientId;
  if (typeof clientId !== 'string' || !SMART_CLIENT_ID_PATTERN.test(clientId)) {
    throw new InvalidInputError(
      `${field}.clientId`,
      'must be 1 to 255 visible ASCII characters (no spaces): the client_id your EHR assigned',
    );
  }
  return { clientId };
}

/** The shortest retention period a tenant may set (whole days). */
export const MIN_RETENTION_DAYS = 1;
/** The longest retention period a tenant may set (whole days, ten years); longer: leave it unset. */
export const MAX_RETENTION_DAYS = 3653;

/**
 * Validates a tenant's retention period (`{ recordDays }`: whole days, 1 to 3653).
 * @throws InvalidInputError naming the field (`retention.recordDays`).
 */
export function validateTenantRetention(value: unknown, field = 'retention'): TenantRetention {
  const raw = requireObject(value, field);
  rejectUnknown(raw, ['recordDays'], field);
  const days = raw.recordDays;
  if (
    typeof days !== 'number' ||
    !Number.isInteger(days) ||
    days < MIN_RETENTION_DAYS ||
    days > MAX_RETENTION_DAYS
  ) {
    throw new InvalidInputError(
      `${field}.recordDays`,
      `must be a whole number of days from ${String(MIN_RETENTION_DAYS)} to ${String(MAX_RETENTION_DAYS)} (leave retention out, or null, to keep records forever)`,
    );
  }
  return { recordDays: days };
}

/** Checks one registered JWK: public, asymmetric, signing, with a kid, importable. */
async function validatePublicJwk(value: unknown, field: string): Promise<Json> {
  const key = requireObject(value, field);
  for (const member of PRIVATE_JWK_MEMBERS) {
    if (Object.hasOwn(key, member)) {
      throw new InvalidInputError(
        field,
        `must be a public key (private member '${member}' present)`,
      );
    }
  }
  if (typeof key.kid !== 'string' || key.kid.length === 0 || key.kid.length > 256) {
    throw new InvalidInputError(`${field}.kid`, 'is required (a non-empty string)');
  }
  if (key.kty !== 'EC' && key.kty !== 'RSA') {
    throw new InvalidInputError(`${field}.kty`, "must be 'EC' or 'RSA'");
  }
  if (key.kty === 'EC' && (typeof key.crv !== 'string' || !EC_CURVES.has(key.crv))) {
    throw new InvalidInputError(`${field}.crv`, 'must be P-256, P-384 or P-521');
  }
  if (key.use !== undefined && key.use !== 'sig') {
    throw new InvalidInputError(`${field}.use`, "must be 'sig' when present");
  }
  if (key.alg !== undefined && (typeof key.alg !== 'string' || !SIGNING_ALGS.has(key.alg))) {
    throw new InvalidInputError(
      `${field}.alg`,
      'must be an asymmetric signing algorithm when present',
    );
  }
  let imported: nodeJose.JWK.Key;
  try {
    imported = await nodeJose.JWK.asKey(key);
  } catch {
    throw new InvalidInputError(field, 'is not a valid JWK');
  }
  if (key.kty === 'RSA' && imported.length < MIN_RSA_BITS) {
    throw new InvalidInputError(field, `RSA keys must have at least ${MIN_RSA_BITS} bits`);
  }
  return key;
}

async function validateJwks(value: unknown, field: string): Promise<Jwks> {
  const jwks = requireObject(value, field);
  if (jwks.keys === undefined && jwks.kty !== undefined) {
    throw new InvalidInputError(
      field,
      'must be a JWK Set {"keys": [ ... ]}, not a single JWK: wrap the key in {"keys": [ ... ]}',
    );
  }
  rejectUnknown(jwks, ['keys'], field);
  const keys = requireArray(jwks.keys, `${field}.keys`, MAX_KEYS);
  if (keys.length === 0) {
    throw new InvalidInputError(`${field}.keys`, 'must contain at least one key');
  }
  const out: Json[] = [];
  const kids = new Set<string>();
  for (const [j, k] of keys.entries()) {
    const key = await validatePublicJwk(k, `${field}.keys[${j}]`);
    const kid = key.kid as string;
    if (kids.has(kid)) {
      throw new InvalidInputError(`${field}.keys[${j}].kid`, 'must be unique within the key set');
    }
    kids.add(kid);
    out.push({ ...key });
  }
  return { keys: out };
}

async function validateIssuer(value: unknown, field: string): Promise<TrustedIssuer> {
  const raw = requireObject(value, field);
  rejectUnknown(raw, ['iss', 'jwks', 'jwksUri', 'jku'], field);
  if (typeof raw.iss !== 'string' || !parseAbsoluteUrl(raw.iss)) {
    throw new InvalidInputError(`${field}.iss`, 'must be a URI');
  }
  const issuer: TrustedIssuer = { iss: raw.iss };
  const hasJwks = raw.jwks !== undefined;
  const hasUri = raw.jwksUri !== undefined;
  if (hasJwks === hasUri) {
    throw new InvalidInputError(field, 'must have exactly one of jwks or jwksUri');
  }
  if (hasJwks) {
    issuer.jwks = await validateJwks(raw.jwks, `${field}.jwks`);
  } else {
    const problem = keyUrlProblem(raw.jwksUri);
    if (problem) {
      throw new InvalidInputError(`${field}.jwksUri`, problem);
    }
    issuer.jwksUri = raw.jwksUri as string;
  }
  if (raw.jku !== undefined) {
    const list = requireArray(raw.jku, `${field}.jku`, MAX_LIST);
    issuer.jku = list.map((u, k) => {
      const problem = keyUrlProblem(u);
      if (problem) {
        throw new InvalidInputError(`${field}.jku[${k}]`, problem);
      }
      return u as string;
    });
  }
  return issuer;
}

async function validateIssuers(value: unknown): Promise<TrustedIssuer[]> {
  const list = requireArray(value, 'issuers', MAX_ISSUERS);
  if (list.length === 0) {
    throw new InvalidInputError('issuers', 'must contain at least one issuer');
  }
  const out: TrustedIssuer[] = [];
  const seen = new Set<string>();
  for (const [i, entry] of list.entries()) {
    const issuer = await validateIssuer(entry, `issuers[${i}]`);
    if (seen.has(issuer.iss)) {
      throw new InvalidInputError(`issuers[${i}].iss`, 'is registered twice for this tenant');
    }
    seen.add(issuer.iss);
    out.push(issuer);
  }
  return out;
}

/**
 * The operator's confirmation that an issuer may become shared (`sharedIssuer: true`): a request
 * field, never stored. Absent is false.
 * @throws InvalidInputError (`sharedIssuer`) unless a boolean.
 */
function validateSharedIssuer(value: unknown): boolean {
  if (value === undefined) {
    return false;
  }
  if (typeof value !== 'boolean') {
    throw new InvalidInputError('sharedIssuer', 'must be true or false');
  }
  return value;
}

/**
 * Validates and normalises a new tenant. `sharedIssuer` is the request's confirmation that one
 * of its issuers may become shared with another tenant (checked by the repository in its write transaction, `checkIssuerSharing`).
 * @throws InvalidInputError naming the first offending field.
 */
export async function validateNewTenant(
  input: unknown,
): Promise<NewTenant & { fhirServers: string[]; sharedIssuer: boolean }> {
  const raw = requireObject(input, '(body)');
  rejectUnknown(
    raw,
    [
      'id',
      'name',
      'region',
      'issuers',
      'fhirServers',
      'residency',
      'smart',
      'retention',
      'sharedIssuer',
    ],
    '',
  );
  return {
    id: validateTenantId(raw.id),
    name: validateName(raw.name),
    region: validateRegion(raw.region),
    issuers: await validateIssuers(raw.issuers),
    fhirServers: raw.fhirServers === undefined ? [] : validateFhirServers(raw.fhirServers),
    ...(raw.residency !== undefined ? { residency: validateResidencyPolicy(raw.residency) } : {}),
    ...(raw.smart !== undefined ? { smart: validateTenantSmart(raw.smart) } : {}),
    ...(raw.retention !== undefined && raw.retention !== null
      ? { retention: validateTenantRetention(raw.retention) }
      : {}),
    sharedIssuer: validateSharedIssuer(raw.sharedIssuer),
  };
}

/**
 * Validates a tenant patch (only the fields present are checked and returned); `sharedIssuer`
 * as in `validateNewTenant` (false when absent).
 * @throws InvalidInputError naming the first offending field.
 */
export async function validateTenantPatch(
  input: unknown,
): Promise<TenantPatch & { sharedIssuer: boolean }> {
  const raw = requireObject(input, '(body)');
  rejectUnknown(
    raw,
    ['name', 'status', 'issuers', 'fhirServers', 'residency', 'smart', 'retention', 'sharedIssuer'],
    '',
  );
  const patch: TenantPatch & { sharedIssuer: boolean } = {
    sharedIssuer: validateSharedIssuer(raw.sharedIssuer),
  };
  if (raw.name !== undefined) {
    patch.name = validateName(raw.name);
  }
  if (raw.status !== undefined) {
    patch.status = validateStatus(raw.status);
  }
  if (raw.issuers !== undefined) {
    patch.issuers = await validateIssuers(raw.issuers);
  }
  if (raw.fhirServers !== undefined) {
    patch.fhirServers = validateFhirServers(raw.fhirServers);
  }
  if (raw.residency !== undefined) {
    patch.residency = raw.residency === null ? null : validateResidencyPolicy(raw.residency);
  }
  if (raw.smart !== undefined) {
    patch.smart = raw.smart === null ? null : validateTenantSmart(raw.smart);
  }
  if (raw.retention !== undefined) {
    patch.retention = raw.retention === null ? null : validateTenantRetention(raw.retention);
  }
  return patch;
}

/**
 * Validates subscriptions against the catalog (`exists(pack, version)`); a canary share is at
 * most {@link MAX_CANARY_PERCENT}.
 * @throws InvalidInputError naming the field (`subscriptions[0].canary.percent`).
 */
export async function validateSubscriptions(
  input: unknown,
  exists: (pack: string, version: string) => Promise<boolean>,
): Promise<Subscription[]> {
  const list = requireArray(input, 'subscriptions', MAX_SUBSCRIPTIONS);
  const out: Subscription[] = [];
  const packs = new Set<string>();
  for (const [i, entry] of list.entries()) {
    const sub = await validateSubscription(entry, exists, `subscriptions[${i}]`);
    if (packs.has(sub.pack)) {
      throw new InvalidInputError(`subscriptions[${i}].pack`, 'is subscribed twice');
    }
    packs.add(sub.pack);
    out.push(sub);
  }
  return out;
}

/**
 * Validates one subscription entry against the catalog; `field` names it (`subscriptions[2]`),
 * or is empty for an entry that is the whole body (its fields named `version`, `canary.percent`).
 * @throws InvalidInputError naming the field.
 */
export async function validateSubscription(
  entry: unknown,
  exists: (pack: string, version: string) => Promise<boolean>,
  field: string,
): Promise<Subscription> {
  const at = (name: string) => (field === '' ? name : `${field}.${name}`);
  const raw = requireObject(entry, field === '' ? '(body)' : field);
  rejectUnknown(raw, ['pack', 'version', 'canary'], field);
  if (typeof raw.pack !== 'string' || raw.pack.length === 0 || raw.pack.length > 128) {
    throw new InvalidInputError(at('pack'), 'must be a pack id');
  }
  if (typeof raw.version !== 'string' || semver.valid(raw.version) === null) {
    throw new InvalidInputError(at('version'), 'must be a semver version');
  }
  if (!(await exists(raw.pack, raw.version))) {
    throw new InvalidInputError(at('version'), 'this pack version is not in the catalog');
  }
  const sub: Subscription = { pack: raw.pack, version: raw.version };
  if (raw.canary !== undefined) {
    const canary = requireObject(raw.canary, at('canary'));
    rejectUnknown(canary, ['version', 'percent'], at('canary'));
    if (typeof canary.version !== 'string' || semver.valid(canary.version) === null) {
      throw new InvalidInputError(at('canary.version'), 'must be a semver version');
    }
    if (!(await exists(raw.pack, canary.version))) {
      throw new InvalidInputError(at('canary.version'), 'this pack version is not in the catalog');
    }
    const percent = canary.percent;
    if (typeof percent !== 'number' || !Number.isFinite(percent) || percent < 0) {
      throw new InvalidInputError(
        at('canary.percent'),
        `must be a number from 0 to ${MAX_CANARY_PERCENT}`,
      );
    }
    assertCanaryPercentAllowed(canary, at('canary.percent'));
    sub.canary = { version: canary.version, percent };
  }
  return sub;
}

/**
 * Public types of the control plane (no PHI): tenants, issuers, subscriptions, pack catalog,
 * admin principals, audit, and client-token verification.
 */
import type { Subscription, RulePack, PackRef } from '../rules/index.ts';
import type { ChainHead, ChainVerification } from './data-plane/hash-chain.ts';

export type TenantStatus = 'active' | 'suspended';

/** A JSON Web Key Set as registered for an issuer (public keys only). */
export interface Jwks {
  keys: Array<Record<string, unknown>>;
}

/** An EHR (CDS client) trusted to call on behalf of a tenant. */
export interface TrustedIssuer {
  iss: string;
  /** Inline public keys, or... */
  jwks?: Jwks;
  /** ...a URL the service fetches the JWK Set from (https in production). */
  jwksUri?: string;
  /** `jku` header values this issuer may use; any other jku is refused. */
  jku?: string[];
}

export interface Tenant {
  id: string;
  name: string;
  /** Home region id. */
  region: string;
  status: TenantStatus;
  issuers: TrustedIssuer[];
  /** FHIR server base URLs the service may fetch prefetch data from for this tenant. */
  fhirServers: string[];
  subscriptions: Subscription[];
  /**
   * The residency policy as registered; absent means the default (processing and backups in
   * the home region only, no DR). Use `effectiveResidency(tenant)` to read it.
   */
  residency?: ResidencyPolicyInput;
  /** A declared failover: while set, this standby region may serve the tenant too. */
  failover?: ActiveFailover;
  /**
   * The SMART card viewer's registration at this tenant's EHR. Absent: the deployment's
   * default client id (CELLCDS_SMART_CLIENT_ID) applies, if set.
   */
  smart?: TenantSmart;
  /**
   * How long the tenant's invocation records (and their feedback) are kept. Absent: forever
   * (the default); records older than the period are purged (`TenantStore.purgeRecords`).
   */
  retention?: TenantRetention;
  createdAt: string;
  updatedAt: string;
}

export interface NewTenant {
  id: string;
  name: string;
  region: string;
  issuers: TrustedIssuer[];
  fhirServers?: string[];
  residency?: ResidencyPolicyInput;
  smart?: TenantSmart;
  retention?: TenantRetention;
  /**
   * The operator's confirmation that an issuer already registered to one other tenant becomes
   * shared (its every token must then carry `tenant`). Not stored. Without it: ConflictError.
   */
  sharedIssuer?: boolean;
}

/**
 * A tenant's retention period: invocation records whose invocation time is more than
 * `recordDays` whole days (of 24 h) ago are purged with their feedback, and the purge audited.
 */
export interface TenantRetention {
  /** Whole days, 1..MAX_RETENTION_DAYS (tenant-validation.ts). */
  recordDays: number;
}

/** How the SMART card viewer is registered at a tenant's EHR. */
export interface TenantSmart {
  /**
   * The OAuth `client_id` the tenant's EHR assigned to the viewer: sent in the authorization
   * request of the tenant's launches, and the only `aud` its id_tokens may carry.
   */
  clientId: string;
}

/** An active tenant's SMART launch registration, as the unauthenticated launch page needs it. */
export interface SmartLaunchTarget {
  tenant: string;
  /** FHIR server base URLs as registered. */
  fhirServers: readonly string[];
  /** The tenant's own client id; absent means the deployment's default. */
  clientId?: string;
}

export interface TenantPatch {
  name?: string;
  status?: TenantStatus;
  issuers?: TrustedIssuer[];
  fhirServers?: string[];
  /** A new residency policy; `null` resets it to the default. */
  residency?: ResidencyPolicyInput | null;
  /** A new SMART registration; `null` removes it (the default client id applies again). */
  smart?: TenantSmart | null;
  /** A new retention period; `null` removes it (records are kept forever again). */
  retention?: TenantRetention | null;
  /** As NewTenant's, for the issuers of this patch. */
  sharedIssuer?: boolean;
}

export type Role = 'platform-operator' | 'tenant-admin' | 'rule-author' | 'auditor';

/** Who is calling the admin API, resolved from an operator bearer token. */
export interface Principal {
  tokenId: string;
  role: Role;
  /** Set for tenant-scoped roles (tenant-admin, auditor). */
  tenant?: string;
}

/** A stored rule-pack version in the catalog (immutable once stored). */
export interface StoredPack extends PackRef {
  pack: RulePack;
  uploadedAt: string;
  uploadedBy?: string;
}

/** An audit event (never PHI, never secrets). */
export interface AuditEvent {
  type: string;
  outcome: 'success' | 'failure';
  tenant?: string;
  actor?: string;
  /** Small, PHI-free details (ids, reasons, counts). */
  detail?: Record<string, string | number | boolean>;
}

/** Who a verified CDS client token speaks for. */
export interface ClientIdentity {
  tenant: Tenant;
  iss: string;
  jti: string;
  /** `exp` claim, seconds since the epoch. */
  exp: number;
  kid: string;
}

/**
 * Why a token was refused. Goes to the audit log and metrics, never to the client
 * (which only ever sees "invalid token").
 */
export type AuthFailureReason =
  | 'missing'
  | 'malformed'
  | 'bad_alg'
  | 'bad_typ'
  | 'unknown_issuer'
  /** The header has no `kid` (the issuer's key cannot be chosen). */
  | 'missing_kid'
  /** The issuer's key set has no usable key with the header's `kid`. */
  | 'unknown_kid'
  | 'bad_jku'
  | 'bad_signature'
  | 'bad_aud'
  | 'expired'
  | 'future_iat'
  | 'lifetime'
  | 'missing_claim'
  | 'replayed'
  | 'bad_tenant'
  | 'suspended'
  | 'jwks_unavailable'
  /** `nbf` is in the future (beyond the leeway). */
  | 'not_yet_valid'
  /**
   * The replay cache is full of unexpired entries (its size, or Redis's memory under
   * `noeviction`): fail closed, but 503 with Retry-After (a full cache says nothing about the
   * token). Size the cache (docs/operations.md).
   */
  | 'replay_unavailable'
  /**
   * The replay cache's backend (Redis) does not answer (refused, lost, timed out): fail closed,
   * but 503 with Retry-After, since the token may be valid.
   */
  | 'replay_backend_down'
  /**
   * Redis may have lost this token's jti (it restarted, failed over or evicted keys since the
   * token was issued): fail closed, 503 with Retry-After (a new token passes).
   */
  | 'replay_backend_reset'
  /**
   * Redis's clock (entries expire on it) and this process's differ by more than the leeway:
   * fail closed, 503 with Retry-After, until they agree. Fix NTP.
   */
  | 'replay_clock_skew'
  /**
   * The replay cache's Redis cannot be watched for lost jtis (older than 7.0, or `INFO`/`TIME`
   * refused or missing fields): fail closed, 503 with Retry-After. Fix Redis's configuration.
   */
  | 'replay_backend_unsupported'
  /**
   * The replay cache's backend (Redis) may evict keys (`maxmemory-policy` not `noeviction`), so
   * a jti could be forgotten: fail closed, 503 with Retry-After. Fix the policy.
   */
  | 'replay_policy_evicts'
  /**
   * The replay cache is nearly full and the token's issuer holds its share for the token's
   * tenant; the others (other tenants of the same issuer too) go on.
   */
  | 'replay_quota';

/**
 * What the replay cache's backend (Redis, in scale-out) is doing: `up` answers and keeps every
 * key until its expiry; `down` does not answer (connection refused or lost, command timeout);
 * `evicting` answers but may evict keys under memory pressure (a jti could be forgotten).
 */
export type ReplayBackendState = 'up' | 'down' | 'evicting';

/**
 * Remembers `(tenant, iss, jti)` until the token's `exp`; shared across replicas in scale-out
 * (Redis). Tenants whose EHRs use the same issuer have their own jti space and their own share.
 */
export interface ReplayCache {
  /**
   * Stores the entry and returns true if it was not seen before; false if it is a replay.
   * `tenant` is the id of the tenant the token's signature proved.
   * @throws ReplayIssuerQuotaError when the `(tenant, iss)` holds its share and the cache is
   * nearly full; ReplayCacheFullError when the cache is full; ReplayBackendError when its
   * backend does not answer (`down`) or may evict keys (`evicting`); any other error is taken
   * as a backend that does not answer. `iatSeconds` (the token's `iat`) lets a cache whose
   * backend may have lost entries (a Redis restarted or evicting) refuse the tokens issued
   * before; the in-process cache ignores it.
   */
  remember(
    tenant: string,
    iss: string,
    jti: string,
    expSeconds: number,
    iatSeconds?: number,
  ): Promise<boolean>;
  /**
   * The backend's state as the last commands and policy reads found it: cheap (no I/O), never
   * throws; for readiness and gauges. `down` until the backend first answered. The in-process
   * cache is always `up`.
   */
  state?(): ReplayBackendState;
  close?(): Promise<void>;
}

// ---------------------------------------------------------------------------------------------
// Added by the control-plane / token-verification work (issue 2, items 5-7).
// ---------------------------------------------------------------------------------------------

/**
 * What an admin principal asks to do. `authorize()` decides; `records:read` is patient content
 * (decrypted invocation records, feedback, replay), which platform operators may never read.
 */
export type AdminAction =
  | 'tenant:create'
  | 'tenant:list'
  | 'tenant:read'
  | 'tenant:update'
  | 'tenant:delete'
  | 'tenant:subscriptions'
  | 'token:issue'
  | 'token:list'
  | 'token:revoke'
  | 'pack:upload'
  | 'pack:read'
  | 'pack:rollout'
  | 'audit:read'
  | 'records:read';

/** Input of `adminTokens.issue`. `tenant` is required for tenant-admin/auditor, forbidden otherwise. */
export interface NewAdminToken {
  role: Role;
  tenant?: string;
  label?: string;
  /** Whole days, 1 to 365; default 90. Never past the issuing token's own expiry. */
  expiresInDays?: unknown;
  /** The issuing principal's token id: stored when it names an issued token (which must be live). */
  issuedBy?: string;
}

/** The result of `adminTokens.issue`: the only time the plaintext token exists outside the caller. */
export interface IssuedAdminToken {
  id: string;
  token: string;
  expiresAt: string;
}

/** An admin token as listed (never its hash, never the token). */
export interface AdminTokenInfo {
  id: string;
  role: Role;
  tenant?: string;
  label?: string;
  createdAt: string;
  /** The id of the token that issued it (absent: the bootstrap operator or the CLI). */
  issuedBy?: string;
  /** Absent: never expires (tokens issued before expiries existed). */
  expiresAt?: string;
  revokedAt?: string;
  /**
   * When it last authenticated, to within 5 minutes (written at most that often). Absent: no
   * use recorded: never used, or not since the control plane began recording uses.
   */
  lastUsedAt?: string;
}

/** Why a token was refused: `revoked`/`expired` only for a stored token, named by its id. */
export type AdminTokenRefusal =
  { reason: 'unknown'; tokenId?: undefined } | { reason: 'revoked' | 'expired'; tokenId: string };

/** A token revoked with the one named (its descendant): who it was, and who issued it. */
export interface RevokedAdminToken {
  id: string;
  tenant?: string;
  issuedBy?: string;
}

/** The outcome of `adminTokens.check`: the principal, or why there is none. */
export type AdminTokenCheck = { principal: Principal } | { refused: AdminTokenRefusal };

/** Input of `packs.put`: an already validated pack with its content hash. */
export interface NewStoredPack extends PackRef {
  pack: RulePack;
  uploadedBy?: string;
}

/** A catalog row without the pack body. */
export interface PackSummary extends PackRef {
  uploadedAt: string;
  uploadedBy?: string;
}

/** An audit event as stored: append-only, ordered by `seq`. */
export interface StoredAuditEvent extends AuditEvent {
  seq: number;
  /** ISO 8601 instant (UTC). */
  at: string;
}

/** Filters for `audit.list` (all optional; `from` inclusive, `to` exclusive). */
export interface AuditQuery {
  from?: string | Date;
  to?: string | Date;
  tenant?: string;
  type?: string;
  /** The events whose `detail.requestId` is exactly this id (the `X-Request-Id` a refusal named). */
  requestId?: string;
}

/** Tenant registry (control plane, no PHI). */
export interface TenantRepository {
  /**
   * Registers a tenant. Its placement is checked against its residency policy (and, when
   * `opts.regions` is given, against the region matrix).
   * @throws InvalidInputError (400), ConflictError (409: the id is taken or retired; an issuer
   *   registered to one other tenant without `sharedIssuer: true`, checked in the write
   *   transaction), ResidencyError (422; a `residency.refused` audit event is recorded before it
   *   is thrown).
   */
  create(input: NewTenant, opts?: PlacementOptions): Promise<Tenant>;
  get(id: string): Promise<Tenant>;
  list(): Promise<Tenant[]>;
  /**
   * Updates a tenant. A `residency` patch is checked like `create`'s, and must keep an active
   * failover allowed. New issuers are checked like `create`'s.
   * @throws InvalidInputError, NotFoundError, ConflictError (issuer sharing), ResidencyError
   *   (audited).
   */
  update(id: string, patch: TenantPatch, opts?: PlacementOptions): Promise<Tenant>;
  /**
   * Lets the standby region `target` serve the tenant (operator action). Records
   * `residency.failover.declared` in the same transaction, or `residency.refused` and throws.
   * Declaring the active failover again changes nothing.
   * @throws NotFoundError, ResidencyError (not a failover target of the home region, the DR
   *   rule forbids it, another failover is active).
   */
  declareFailover(id: string, target: string, opts: ResidencyActionOptions): Promise<Tenant>;
  /** Ends the active failover (`residency.failover.cleared`); no-op without one. @throws NotFoundError. */
  clearFailover(id: string, opts?: { actor?: string }): Promise<Tenant>;
  /**
   * Moves the home region to `target` (the commit point of a migration: call it once the
   * target store holds the data). Records `residency.home.moved`, or `residency.refused`
   * and throws. @throws NotFoundError, ResidencyError (target not an allowed processing
   *   region, unknown, the same, or a failover is active).
   */
  moveHome(id: string, target: string, opts: ResidencyActionOptions): Promise<Tenant>;
  setSubscriptions(id: string, subscriptions: Subscription[]): Promise<Tenant>;
  /**
   * Sets one pack's subscription (pinned version and canary; an entry validated as in
   * `setSubscriptions`, its fields named without the `subscriptions[0].` prefix), keeping the
   * tenant's other packs, in one transaction. With `existingOnly`, the tenant must already
   * subscribe to that pack (checked in the transaction).
   * @throws NotFoundError (tenant), InvalidInputError, ConflictError (`existingOnly` and not
   *   subscribed; or the tenant would have more than MAX_SUBSCRIPTIONS packs).
   */
  setSubscription(
    id: string,
    subscription: unknown,
    opts?: { existingOnly?: boolean },
  ): Promise<Tenant>;
  /** Drops one pack's subscription, in one transaction. @throws NotFoundError (tenant, subscription). */
  removeSubscription(id: string, pack: string): Promise<Tenant>;
  /** Every tenant (active or suspended) that registered this exact `iss`. */
  findByIssuer(iss: string): Promise<Tenant[]>;
  /**
   * What `findByIssuer(iss)` answered under the last control-plane generation it read, if it is
   * still remembered: no I/O, possibly out of date. Only for work started ahead of
   * `findByIssuer` and used once it returns the very same objects (nothing changed meanwhile).
   */
  peekIssuer?(iss: string): readonly Tenant[] | undefined;
  /**
   * The FHIR server URLs (as registered, each once) that active tenants allowlist. The same
   * frozen array is answered while the control plane does not change, so a caller may derive
   * and keep something per answer (the SMART launch page checks every unauthenticated `iss`).
   */
  activeFhirServers(): Promise<readonly string[]>;
  /**
   * The `[pack, version]` pairs active tenants subscribe to (pinned and canary), each once. The
   * same frozen array is answered while the control plane does not change: a replica polling it
   * for versions to warm reads the generation, not every tenant.
   */
  subscribedVersions(): Promise<readonly (readonly [string, string])[]>;
  /**
   * Every active tenant's FHIR servers and SMART client id, for the launch page (which must
   * pick the launching tenant's client id without a pass over every tenant per request). The
   * same frozen array is answered while the control plane does not change.
   */
  smartLaunchTargets(): Promise<readonly SmartLaunchTarget[]>;
  /**
   * Removes a deprovisioned tenant from the registry, revokes its tenant-scoped admin tokens
   * and retires its id (`retiredAt`), in one transaction. @throws NotFoundError.
   */
  remove(id: string): Promise<void>;
  /**
   * When the id was retired (its tenant deprovisioned), else undefined. A retired id is never
   * registered again: `create` refuses it with ConflictError (409).
   */
  retiredAt?(id: string): Promise<string | undefined>;
}

/** Rule-pack catalog: `(id, version)` is immutable once stored. */
export interface PackRepository {
  put(input: NewStoredPack): Promise<'created' | 'unchanged'>;
  get(id: string, version: string): Promise<StoredPack>;
  list(): Promise<PackSummary[]>;
  /** Stored versions of one pack, ascending by semver ([] if none). */
  versions(id: string): Promise<string[]>;
}

/** Admin bearer tokens, stored only as sha256 hashes. */
export interface AdminTokenRepository {
  issue(input: NewAdminToken): Promise<IssuedAdminToken>;
  authenticate(token: string): Promise<Principal | undefined>;
  /** As `authenticate`, saying why a token was refused (audited, never told to the caller). */
  check(token: string): Promise<AdminTokenCheck>;
  /**
   * Revokes the token and, in one transaction, every token it issued, transitively.
   * @returns the descendants this revocation took with it (those live until then).
   */
  revoke(id: string): Promise<RevokedAdminToken[]>;
  list(): Promise<AdminTokenInfo[]>;
}

/** Control-plane audit log: append-only, hash-chained (audit-repository.ts). */
export interface AuditRepository {
  record(event: AuditEvent): Promise<StoredAuditEvent>;
  list(query?: AuditQuery): Promise<StoredAuditEvent[]>;
  /** Verifies the hash chain of the control-plane audit log (and its head anchor). */
  verify(): Promise<ChainVerification>;
  /** The stored head (`seq` 0 and the genesis hash when empty): what to keep as an anchor. */
  head(): Promise<ChainHead>;
  /** The stored hash of the event at `seq` (undefined: none), to check a kept anchor. */
  hashAt(seq: number): Promise<string | undefined>;
}

/** The control plane: one SQLite (or, later, PostgreSQL) database without PHI. */
export interface ControlPlane {
  tenants: TenantRepository;
  packs: PackRepository;
  adminTokens: AdminTokenRepository;
  audit: AuditRepository;
  /**
   * A cheap liveness read of the control-plane database (`SELECT 1` on a kept connection), for
   * readiness probes: never a table scan. Rejects when the database cannot answer.
   */
  ping(): Promise<void>;
  close(): Promise<void>;
}

/** Fetches a JWK Set by URL (timeout, size cap, cache with refetch cooldown). */
export interface JwksFetcher {
  /**
   * Returns the (cached) key set. `forceRefresh` refetches unless the last fetch of this URL
   * is younger than the cooldown, in which case the cached set is returned.
   */
  get(url: string, opts?: { forceRefresh?: boolean }): Promise<Jwks>;
  /** The cached set if still fresh, without any request (else undefined). */
  peek(url: string): Jwks | undefined;
}

/** Verifies CDS client JWTs: see `createTokenVerifier`. */
export interface TokenVerifier {
  verify(authorization: string | undefined, audience: string): Promise<ClientIdentity>;
}

// ---------------------------------------------------------------------------------------------
// Residency (issue 5): where a tenant's data may be processed, backed up and failed over to.
// ---------------------------------------------------------------------------------------------

/** What tenants/ needs to know of a region (server/regions.ts's `Region` is a superset). */
export interface RegionInfo {
  id: string;
  /** Jurisdiction label such as `US` or `EU`; the `jurisdiction` DR rule compares these. */
  jurisdiction: string;
  /** Regions this region's tenants may fail over to (operator-declared). */
  failover: readonly string[];
}

/** Where a tenant may be served from during a declared failover. */
export type DrRule =
  { mode: 'none' } | { mode: 'jurisdiction' } | { mode: 'regions'; regions: string[] };

/** A residency policy as registered; an omitted part takes its default. */
export interface ResidencyPolicyInput {
  /** Regions that may be the home region (normal processing, migration targets). Default [home]. */
  processingRegions?: string[];
  /** Regions whose backup location may hold the tenant's backups. Default [home]. */
  backupRegions?: string[];
  /** Failover rule. Default `{ mode: 'none' }`. */
  dr?: DrRule;
}

/** A residency policy with every default filled in (see `effectiveResidency`). */
export interface ResidencyPolicy {
  processingRegions: string[];
  backupRegions: string[];
  dr: DrRule;
}

/** A failover declared by an operator. */
export interface ActiveFailover {
  region: string;
  /** ISO 8601 instant (UTC). */
  declaredAt: string;
  /** Who declared it (`role:tokenId`, or `unknown`). */
  by: string;
}

/** Why a placement, failover, backup or migration is refused. */
export type ResidencyReason =
  | 'unknown_region'
  | 'home_not_processing'
  | 'not_processing_region'
  | 'same_region'
  | 'not_failover_target'
  | 'dr_none'
  | 'dr_other_jurisdiction'
  | 'dr_not_listed'
  | 'failover_active'
  | 'failover_not_allowed'
  | 'not_backup_region';

/** One problem with a placement; `path` names the field (`residency.backupRegions[1]`). */
export interface ResidencyProblem {
  path: string;
  reason: ResidencyReason;
  /** Safe text: region ids and labels only. */
  message: string;
}

/** Options of `tenants.create`/`update`: the region matrix to check the placement against. */
export interface PlacementOptions {
  /** The configured regions. Without it only the matrix-free checks run (home is a processing region). */
  regions?: readonly RegionInfo[];
  /** Recorded as the audit event's actor. */
  actor?: string;
}

/** Options of failover and migration actions: the region matrix is required. */
export interface ResidencyActionOptions {
  regions: readonly RegionInfo[];
  actor?: string;
}

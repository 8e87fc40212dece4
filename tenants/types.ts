/**
 * Public types of the control plane (no PHI): tenants, issuers, subscriptions, pack catalog,
 * admin principals, audit, and client-token verification.
 */
import type { Subscription, RulePack, PackRef } from '../rules/index.ts';

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
  createdAt: string;
  updatedAt: string;
}

export interface NewTenant {
  id: string;
  name: string;
  region: string;
  issuers: TrustedIssuer[];
  fhirServers?: string[];
}

export interface TenantPatch {
  name?: string;
  status?: TenantStatus;
  issuers?: TrustedIssuer[];
  fhirServers?: string[];
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
  /** The replay cache could not record the jti (full, or its backend is down): fail closed. */
  | 'replay_unavailable';

/** Remembers `(iss, jti)` until the token's `exp`; shared across replicas in scale-out (Redis). */
export interface ReplayCache {
  /** Stores the pair and returns true if it was not seen before; false if it is a replay. */
  remember(iss: string, jti: string, expSeconds: number): Promise<boolean>;
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
  | 'audit:read'
  | 'records:read';

/** Input of `adminTokens.issue`. `tenant` is required for tenant-admin/auditor, forbidden otherwise. */
export interface NewAdminToken {
  role: Role;
  tenant?: string;
  label?: string;
}

/** The result of `adminTokens.issue`: the only time the plaintext token exists outside the caller. */
export interface IssuedAdminToken {
  id: string;
  token: string;
}

/** An admin token as listed (never its hash, never the token). */
export interface AdminTokenInfo {
  id: string;
  role: Role;
  tenant?: string;
  label?: string;
  createdAt: string;
  revokedAt?: string;
}

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
}

/** Tenant registry (control plane, no PHI). */
export interface TenantRepository {
  create(input: NewTenant): Promise<Tenant>;
  get(id: string): Promise<Tenant>;
  list(): Promise<Tenant[]>;
  update(id: string, patch: TenantPatch): Promise<Tenant>;
  setSubscriptions(id: string, subscriptions: Subscription[]): Promise<Tenant>;
  /** Every tenant (active or suspended) that registered this exact `iss`. */
  findByIssuer(iss: string): Promise<Tenant[]>;
  remove(id: string): Promise<void>;
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
  revoke(id: string): Promise<void>;
  list(): Promise<AdminTokenInfo[]>;
}

/** Control-plane audit log (append-only; hash chaining comes with issue 4). */
export interface AuditRepository {
  record(event: AuditEvent): Promise<StoredAuditEvent>;
  list(query?: AuditQuery): Promise<StoredAuditEvent[]>;
}

/** The control plane: one SQLite (or, later, PostgreSQL) database without PHI. */
export interface ControlPlane {
  tenants: TenantRepository;
  packs: PackRepository;
  adminTokens: AdminTokenRepository;
  audit: AuditRepository;
  close(): Promise<void>;
}

/** Fetches a JWK Set by URL (timeout, size cap, cache with refetch cooldown). */
export interface JwksFetcher {
  /**
   * Returns the (cached) key set. `forceRefresh` refetches unless the last fetch of this URL
   * is younger than the cooldown, in which case the cached set is returned.
   */
  get(url: string, opts?: { forceRefresh?: boolean }): Promise<Jwks>;
}

/** Verifies CDS client JWTs: see `createTokenVerifier`. */
export interface TokenVerifier {
  verify(authorization: string | undefined, audience: string): Promise<ClientIdentity>;
}

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
  | 'jwks_unavailable';

/** Remembers `(iss, jti)` until the token's `exp`; shared across replicas in scale-out (Redis). */
export interface ReplayCache {
  /** Stores the pair and returns true if it was not seen before; false if it is a replay. */
  remember(iss: string, jti: string, expSeconds: number): Promise<boolean>;
  close?(): Promise<void>;
}

import type {
  AdminAction,
  AuthFailureReason,
  ReplayBackendState,
  ResidencyProblem,
} from './types.ts';

/**
 * Refusals that say nothing about the token: the replay cache's backend does not answer or may
 * evict keys, so the token could not be remembered. HTTP: 503 with Retry-After (clients retry
 * on 5xx), still audited and counted as auth failures.
 */
export const RETRYABLE_AUTH_FAILURES: ReadonlySet<AuthFailureReason> = new Set<AuthFailureReason>([
  'replay_backend_down',
  'replay_backend_reset',
  'replay_clock_skew',
  'replay_backend_unsupported',
  'replay_policy_evicts',
  'replay_unavailable',
]);

/**
 * A CDS client token was refused. HTTP: 401 `invalid_token`, body says no more; 503
 * `unavailable` for the reasons in {@link RETRYABLE_AUTH_FAILURES}.
 */
export class AuthError extends Error {
  readonly reason: AuthFailureReason;
  /**
   * @param tenant only for a refusal after the signature was verified (`replay_quota`): the
   *   tenant the token proved it speaks for, so the refusal is audited in that tenant's trail.
   * @param facts what the operator needs to tell the integrator what to fix, written into the
   *   refusal's audit event (never to the caller): small, flat, bounded values, never the token
   *   or PHI (a missing claim's name, a `kid`, the `aud` sent and the URL expected, the key set
   *   URL and why it could not be fetched).
   */
  constructor(
    reason: AuthFailureReason,
    detail?: string,
    readonly tenant?: string,
    readonly facts: Readonly<Record<string, string | number>> = {},
  ) {
    super(detail ? `${reason}: ${detail}` : reason);
    this.name = new.target.name;
    this.reason = reason;
  }
}

/** An admin bearer token is missing, unknown or revoked. HTTP: 401. */
export class AdminAuthError extends Error {
  constructor(detail: string) {
    super(detail);
    this.name = new.target.name;
  }
}

/** The principal may not do this. HTTP: 403. */
export class ForbiddenError extends Error {
  /** The action refused (the refusal's audited reason and metric label); undefined: unknown. */
  readonly action: AdminAction | undefined;
  /**
   * Set when the refused thing must not be confirmed to the caller (a token of another tenant):
   * the answer is `404 <what> not found`, as for one that does not exist; the refusal is still
   * audited as one.
   */
  readonly hiddenAs: string | undefined;

  constructor(detail: string, opts: { action?: AdminAction; hiddenAs?: string } = {}) {
    super(detail);
    this.name = new.target.name;
    this.action = opts.action;
    this.hiddenAs = opts.hiddenAs;
  }
}

/** The named thing does not exist (or is not visible to the caller). HTTP: 404. */
export class NotFoundError extends Error {
  constructor(what: string) {
    super(`${what} not found`);
    this.name = new.target.name;
  }
}

/** The request conflicts with stored state (duplicate id, immutable version). HTTP: 409. */
export class ConflictError extends Error {
  constructor(detail: string) {
    super(detail);
    this.name = new.target.name;
  }
}

/** A control-plane input is invalid; `field` names it. HTTP: 400 (or 422 for policy). */
export class InvalidInputError extends Error {
  readonly field: string;
  constructor(field: string, message: string) {
    super(`${field}: ${message}`);
    this.name = new.target.name;
    this.field = field;
  }
}

/** A JWK Set could not be fetched or parsed (timeout, size, status, redirect, not JSON). */
export class JwksFetchError extends Error {
  constructor(detail: string, cause?: unknown) {
    super(`jwks: ${detail}`, { cause });
    this.name = new.target.name;
  }
}

/**
 * The replay cache (in memory, or Redis's count, or Redis's own memory under `noeviction`) is
 * full of unexpired entries; the token is refused (fail closed). Size the cache.
 */
export class ReplayCacheFullError extends Error {
  constructor() {
    super('replay cache is full');
    this.name = new.target.name;
  }
}

/**
 * The replay cache's backend cannot be trusted with a jti right now (`state`: `down` or
 * `evicting`): the token is refused (fail closed) though it may be valid. HTTP: 503, retryable,
 * unlike a full cache (`ReplayCacheFullError`).
 */
export class ReplayBackendError extends Error {
  constructor(
    readonly state: Exclude<ReplayBackendState, 'up'>,
    message: string,
    cause?: unknown,
  ) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = new.target.name;
  }
}

/**
 * The token's issuer holds, for the token's tenant, its share of the replay cache
 * (`maxPerIssuer` unexpired entries per `(tenant, iss)`) or more, and the cache's last share of
 * places is kept for the pairs under theirs: its token is refused (fail closed), and the others
 * (other tenants of the same issuer too) are not affected.
 */
export class ReplayIssuerQuotaError extends Error {
  constructor(readonly maxPerIssuer: number) {
    super(
      `the issuer holds its share of the replay cache for this tenant (${maxPerIssuer} unexpired tokens) or more, and the cache is nearly full`,
    );
    this.name = new.target.name;
  }
}

/**
 * A placement, failover or migration that the tenant's residency policy (or the region
 * matrix) forbids. HTTP: 422 `unprocessable` with `problems` (paths, reasons, safe text).
 */
export class ResidencyError extends Error {
  readonly problems: readonly ResidencyProblem[];
  constructor(problems: readonly ResidencyProblem[]) {
    super(
      `residency policy forbids this: ${problems.map((p) => `${p.path}: ${p.message}`).join('; ')}`,
    );
    this.name = new.target.name;
    this.problems = problems;
  }
}

/**
 * This region may not serve this tenant (not its home, no permitted failover here). HTTP: 421
 * `misdirected`, raised before anything of the payload is decrypted or stored.
 */
export class RegionMismatchError extends Error {
  /** The region that refused (this process's). */
  readonly region: string;
  constructor(region: string) {
    super(`region ${region} does not serve this tenant`);
    this.name = new.target.name;
    this.region = region;
  }
}

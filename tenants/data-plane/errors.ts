/**
 * Typed errors of the data plane (keys, sealed records, backups). Messages are safe for logs:
 * ids, versions and reasons only, never PHI, key material or ciphertext. The HTTP mapping is
 * done by `server/error-handler.ts` (suggested statuses are in each class's doc).
 * Not-found, conflict and bad-input cases reuse `NotFoundError`, `ConflictError` and
 * `InvalidInputError` from `tenants/errors.ts`.
 */
import { ConflictError } from '../errors.ts';

/** Why a key could not be used. */
export type KeyUnavailableReason =
  /** The tenant's provider key was destroyed (crypto-shredded): the provider holds its tombstone. */
  | 'tenant_key_destroyed'
  /**
   * The provider holds neither the tenant's key nor a tombstone of it, although the caller needs
   * it (the tenant's store exists): most likely this replica uses an older copy of the region's
   * keyring (restored from a backup taken before the tenant's key was made); another keyring
   * altogether is refused when the stores are opened (`keyring_mismatch`). A server-side fault, never a shred. Suggested HTTP:
   * 503 `unavailable` (another replica, or this one once fixed, can serve it).
   */
  | 'tenant_key_missing'
  /**
   * The region's stores are bound to another keyring than this process's (`keyring-binding.ts`):
   * the replica was started on another keyring folder or KMS key. Raised when the stores are
   * opened, so the process does not start.
   */
  | 'keyring_mismatch'
  /**
   * The region's stores have no keyring binding yet (no server opened them) and this process
   * may not make the first one: an operator command (`cellcds migrate`, `evidence`) opened them
   * with `mayBind: false` (`keyring-binding.ts`). Nothing was bound; start the region's servers
   * once, then run the command again.
   */
  | 'keyring_unbound'
  /** The wrapped DEK names a KEK version the provider does not hold. */
  | 'unknown_kek'
  /** The DEK version is destroyed, or the store has no such version. */
  | 'dek_destroyed'
  /** The wrapped DEK failed authentication (tampered, another tenant's, another version's). */
  | 'unwrap_failed'
  /** The key provider itself failed (unreadable keyring, bad permissions, HSM down). */
  | 'provider'
  /**
   * The DEK version reached its hard wrap limit (AES-GCM invocation limit, wrap-limit.ts): the
   * write is refused until a rotation gives the tenant a new primary version (`WrapLimitError`).
   */
  | 'wrap_limit';

/**
 * The tenant's store is briefly out of use on this process (being restored or deprovisioned):
 * nothing was read or written. A ConflictError for the admin API's callers; a hook call or
 * feedback is told to come back (suggested HTTP: 503 `unavailable` + Retry-After), as a restore
 * of a large store takes tens of seconds.
 */
export class StoreBusyError extends ConflictError {
  /** What the store is going through: `restored`, `deprovisioned`. */
  readonly state: string;
  constructor(tenant: string, state: string) {
    super(`the store of tenant ${tenant} is being ${state}`);
    this.state = state;
  }
}

/**
 * A key needed for this operation cannot be used. Fail closed: nothing is read or written.
 * Suggested HTTP: 500 `internal` (503 for `provider`).
 */
export class KeyUnavailableError extends Error {
  readonly reason: KeyUnavailableReason;
  constructor(reason: KeyUnavailableReason, detail: string, cause?: unknown) {
    super(`key unavailable (${reason}): ${detail}`, { cause });
    this.name = new.target.name;
    this.reason = reason;
  }
}

/**
 * A write would pass the hard wrap limit of a DEK version (wrap-limit.ts): refused, nothing
 * written. Retryable once the tenant's automatic (or an operator's) rotation made a new primary
 * version. Suggested HTTP: 503 `unavailable`, like `provider`.
 */
export class WrapLimitError extends KeyUnavailableError {
  readonly version: number;
  /** The version's wrap count when the write was refused. */
  readonly wraps: number;
  /** The version's DEK row `created_at` (which key of that number), when the store read it. */
  readonly createdAt: string | undefined;
  constructor(tenant: string, version: number, wraps: number, hard: number, createdAt?: string) {
    super(
      'wrap_limit',
      `DEK version ${String(version)} of tenant ${tenant} has made ${String(wraps)} of its ` +
        `${String(hard)} allowed encryptions; rotate the tenant's keys`,
    );
    this.version = version;
    this.wraps = wraps;
    this.createdAt = createdAt;
  }
}

/** Why a sealed record did not open. */
export type RecordOpenReason = 'malformed' | 'authentication_failed' | 'key_unavailable';

/**
 * A sealed record failed to open: tampered bytes, a row copied from another tenant or record,
 * the wrong key, or a destroyed key. `open` never returns null; it throws this.
 * Suggested HTTP: 500 `internal` (loud, audited).
 */
export class RecordOpenError extends Error {
  readonly reason: RecordOpenReason;
  readonly table: string;
  readonly recordId: string;
  constructor(reason: RecordOpenReason, table: string, recordId: string, cause?: unknown) {
    super(`record ${table}/${recordId} failed to open: ${reason}`, { cause });
    this.name = new.target.name;
    this.reason = reason;
    this.table = table;
    this.recordId = recordId;
  }
}

/** Why a backup was refused. */
export type BackupErrorReason =
  | 'manifest'
  | 'checksum'
  | 'wrong_region'
  | 'wrong_tenant'
  | 'wrong_dialect'
  | 'snapshot'
  /** The snapshot's audit hash chain does not verify (edited, deleted or reordered events). */
  | 'audit_chain'
  /** The manifest's counts, audit head or DEK versions are not the snapshot's. */
  | 'manifest_mismatch'
  /**
   * The manifest's MAC does not verify, or its MAC key does not unwrap for the tenant and region
   * the manifest names: the manifest (or a file it checksums) was altered after the backup.
   * Never overridden by `allowUnauthenticated`.
   */
  | 'manifest_signature'
  /**
   * The manifest carries no MAC (format 1, written before manifests were authenticated, or a
   * format-2 manifest stripped of it). Restored only with `allowUnauthenticated`.
   */
  | 'unauthenticated'
  /**
   * The manifest's MAC key cannot be unwrapped: the tenant's provider key was destroyed
   * (crypto-shredded; its records would not open either) or the KEK that wrapped it is gone,
   * so the MAC cannot be checked. Restored (unauthenticated) only with `allowUnauthenticated`.
   */
  | 'key_unavailable'
  /**
   * The backup holds a DEK version (same number and `created_at`) that an emergency rotation
   * has marked compromised since: restoring it would bring that key back. Never overridden;
   * restore a backup taken after that rotation finished.
   */
  | 'dek_compromised';

/**
 * A backup could not be written, or a backup was refused at restore (bad manifest or checksum,
 * a manifest whose MAC does not verify or that has none, another region or tenant, another
 * storage dialect, a snapshot whose audit chain does not verify or that its manifest does not
 * describe). Nothing was restored.
 * Suggested HTTP: 422 `unprocessable` (400 for `manifest`).
 */
export class BackupError extends Error {
  readonly reason: BackupErrorReason;
  constructor(reason: BackupErrorReason, detail: string, cause?: unknown) {
    super(`backup refused (${reason}): ${detail}`, { cause });
    this.name = new.target.name;
    this.reason = reason;
  }
}

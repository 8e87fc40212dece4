/**
 * The AES-GCM invocation limit of a DEK version. Every record key wrapped under a DEK (and every
 * legacy record sealed directly under one) is an AES-256-GCM encryption with a random 96-bit IV,
 * and NIST SP 800-38D allows at most 2^32 of them under one key. The store counts them in the
 * version's row (`dek_versions.wrap_count`, added by its triggers in the writing statement,
 * store-backend.ts); this module enforces two thresholds on the count:
 *
 * - **soft** (default 2^31): the write that brings the primary version to it starts a scheduled
 *   rotation of the tenant's keys (once; actor `system`, reason `wrap_limit` in `key.rotate`),
 *   so new writes go to a fresh version and the rewrap job moves the old records.
 * - **hard** (default 2^32 - 2^20): a write that would pass it is refused, fail closed, with
 *   `KeyUnavailableError('wrap_limit')` (HTTP 503). Reached only if the rotation could not start
 *   (key provider down) or a job keeps wrapping under a full version; a rewrap job that would
 *   pass it fails with that error.
 */
import type { Transaction } from 'sequelize';
import { ConflictError, InvalidInputError } from '../errors.ts';
import { KeyUnavailableError, WrapLimitError } from './errors.ts';
import type { PrimaryDek, StoreHandle } from './store-backend.ts';

/** Wrap counts at which a version is rotated (soft) and refuses writes (hard). */
export interface WrapLimits {
  soft: number;
  hard: number;
}

/** NIST SP 800-38D's 2^32, less a margin for writes in flight when the limit is reached. */
export const DEFAULT_WRAP_LIMITS: Readonly<WrapLimits> = Object.freeze({
  soft: 2 ** 31,
  hard: 2 ** 32 - 2 ** 20,
});

/**
 * The limits of `opts` over the defaults.
 * @throws InvalidInputError unless 1 <= soft < hard <= 2^32 (integers).
 */
export function resolveWrapLimits(opts?: Partial<WrapLimits>): WrapLimits {
  const soft = opts?.soft ?? DEFAULT_WRAP_LIMITS.soft;
  const hard = opts?.hard ?? DEFAULT_WRAP_LIMITS.hard;
  if (!Number.isSafeInteger(hard) || hard < 2 || hard > 2 ** 32) {
    throw new InvalidInputError('wrapLimits.hard', 'must be an integer from 2 to 2^32');
  }
  if (!Number.isSafeInteger(soft) || soft < 1 || soft >= hard) {
    throw new InvalidInputError('wrapLimits.soft', 'must be an integer from 1 to below hard');
  }
  return { soft, hard };
}

/**
 * Wraps already reserved under a locked primary row: by the earlier writes of its transaction,
 * which on a group commit are several callers' writes, each in a SAVEPOINT of its own, all
 * sharing the one row object read at the start (store-backend.ts, createGroupCommit). Keyed by
 * that object, not by the SAVEPOINT's Transaction, so every write of the group counts the ones
 * before it. A write whose SAVEPOINT rolls back keeps its reservation until the COMMIT: the
 * group may refuse a write it had room for, never pass the limit.
 */
const reserved = new WeakMap<PrimaryDek, number>();

/**
 * In a `writeTx` run with `{ primary: true }`, before writing `n` rows sealed under the locked
 * primary version: checks they stay within the hard limit (counting the earlier writes of the
 * transaction's group) and returns the version's count after them. The store's triggers do the
 * counting.
 * @throws WrapLimitError (a KeyUnavailableError, reason `wrap_limit`) if they would pass the
 *   hard limit.
 */
export function reserveWraps(
  h: StoreHandle,
  limits: WrapLimits,
  t: Transaction,
  n: number,
): { version: number; count: number } | undefined {
  const locked = h.lockedPrimary(t);
  if (locked === undefined) {
    return undefined;
  }
  const before = (locked.wrapCount ?? 0) + (reserved.get(locked) ?? 0);
  if (n > 0 && before + n > limits.hard) {
    throw new WrapLimitError(h.tenant, locked.version, before, limits.hard, locked.createdAt);
  }
  reserved.set(locked, (reserved.get(locked) ?? 0) + n);
  return { version: locked.version, count: before + n };
}

/** What `onWrapLimit` is told (ids and counts only). */
export interface WrapLimitEvent {
  tenant: string;
  version: number;
  wraps: number;
  /**
   * `rotation_started`: the soft limit started a rotation (`job`). `rotation_running`: it did
   * not, because that version is no longer primary or a key job is running (a rotation another
   * process started: replicas crossing the limit together rotate once; `error` names ids only).
   * `rotation_failed`: it could not for another reason (`error`, a safe message). Either is
   * tried again after a pause while writes still find the key at the limit. `refused`: a write
   * was refused at the hard limit.
   */
  outcome: 'rotation_started' | 'rotation_running' | 'rotation_failed' | 'refused';
  job?: string;
  error?: string;
}

/**
 * Pause before a soft-limit rotation is tried again for the same key: after a failure (provider
 * down), and after a success too (a key that is primary at its soft limit again, say brought
 * back by a restore taken before a rotation that had not destroyed it yet, is rotated again).
 */
const RETRY_MS = 30_000;

/**
 * A DEK version as the watch tells keys apart: number and `created_at` (numbers start again at
 * 1 after a deprovision + re-provision). `createdAt` undefined: whichever key has the number.
 */
export interface WatchedKey {
  version: number;
  createdAt?: string;
}

/**
 * Starts the soft limit's rotation of a tenant: `committed(tenant, key, count)` after each
 * committed write that sealed under `key`. At most one attempt per tenant is in flight; after
 * an attempt, the same key (number and `created_at`) is tried again by a write after RETRY_MS
 * (another key at once: a re-provisioned tenant's new v1). `rotate` must refuse
 * (ConflictError) if `version` is no longer primary, so replicas that cross the limit together
 * rotate once.
 */
export function createWrapLimitWatch(opts: {
  limits: WrapLimits;
  rotate: (tenant: string, version: number) => Promise<{ id: string }>;
  tell: (event: WrapLimitEvent) => void;
  nowMs?: () => number;
}): {
  committed(tenant: string, key: WatchedKey, count: number): void;
  refused(tenant: string, key: WatchedKey, count: number): void;
  /** Resolves when no rotation it started is in flight (tests, close). */
  idle(): Promise<void>;
} {
  const nowMs = opts.nowMs ?? (() => Date.now());
  interface Attempt {
    version: number;
    createdAt?: string;
    retryAt?: number;
    inFlight?: Promise<void>;
  }
  const state = new Map<string, Attempt>();
  const sameKey = (s: Attempt, key: WatchedKey): boolean =>
    s.version === key.version &&
    (s.createdAt === undefined || key.createdAt === undefined || s.createdAt === key.createdAt);
  return {
    committed(tenant, key, count) {
      if (count < opts.limits.soft) {
        return;
      }
      const s = state.get(tenant);
      if (
        s !== undefined &&
        sameKey(s, key) &&
        (s.inFlight !== undefined || (s.retryAt !== undefined && nowMs() < s.retryAt))
      ) {
        return; // started (or starting) for this key, or tried and pausing
      }
      const { version } = key;
      const entry: Attempt = {
        version,
        ...(key.createdAt !== undefined ? { createdAt: key.createdAt } : {}),
      };
      state.set(tenant, entry);
      entry.inFlight = opts
        .rotate(tenant, version)
        .then((job) => {
          opts.tell({ tenant, version, wraps: count, outcome: 'rotation_started', job: job.id });
        })
        .catch((err: unknown) => {
          opts.tell({
            tenant,
            version,
            wraps: count,
            outcome: err instanceof ConflictError ? 'rotation_running' : 'rotation_failed',
            error: err instanceof KeyUnavailableError ? err.message : safeName(err),
          });
        })
        .finally(() => {
          entry.retryAt = nowMs() + RETRY_MS;
          delete entry.inFlight;
        });
    },
    refused(tenant, key, count) {
      opts.tell({ tenant, version: key.version, wraps: count, outcome: 'refused' });
      // The rotation failed before, or never started here, or the key is primary at its limit
      // again (a restore): try again, after its pause.
      this.committed(tenant, key, Math.max(count, opts.limits.soft));
    },
    async idle() {
      await Promise.all([...state.values()].map((s) => s.inFlight ?? Promise.resolve()));
    },
  };
}

function safeName(err: unknown): string {
  // A ConflictError names ids only (a job running); driver errors may quote SQL: class only.
  if (err instanceof ConflictError) {
    return err.message;
  }
  return err instanceof Error ? `${err.name}: rotation failed` : 'rotation failed';
}

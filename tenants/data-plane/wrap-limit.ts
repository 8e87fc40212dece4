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
import type { StoreHandle } from './store-backend.ts';

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

/** Wraps already reserved in a write transaction (its group's other writes). */
const reserved = new WeakMap<Transaction, number>();

/**
 * In a `writeTx` run with `{ primary: true }`, before writing `n` rows sealed under the locked
 * primary version: checks they stay within the hard limit (counting the group's earlier writes
 * in `t`) and returns the version's count after them. The store's triggers do the counting.
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
  const before = (locked.wrapCount ?? 0) + (reserved.get(t) ?? 0);
  if (n > 0 && before + n > limits.hard) {
    throw new WrapLimitError(h.tenant, locked.version, before, limits.hard);
  }
  reserved.set(t, (reserved.get(t) ?? 0) + n);
  return { version: locked.version, count: before + n };
}

/** What `onWrapLimit` is told (ids and counts only). */
export interface WrapLimitEvent {
  tenant: string;
  version: number;
  wraps: number;
  /**
   * `rotation_started`: the soft limit started a rotation (`job`). `rotation_failed`: it could
   * not (`error`, a safe message; tried again after a pause). `refused`: a write was refused at
   * the hard limit.
   */
  outcome: 'rotation_started' | 'rotation_failed' | 'refused';
  job?: string;
  error?: string;
}

/** Pause before a soft-limit rotation that failed (provider down) is tried again. */
const RETRY_MS = 30_000;

/**
 * Starts the soft limit's rotation of a tenant once: `committed(tenant, version, count)` after
 * each committed write that sealed under `version`. At most one attempt per tenant is in flight;
 * a failed one is tried again by a write after RETRY_MS. `rotate` must refuse (ConflictError)
 * if `version` is no longer primary, so replicas that cross the limit together rotate once.
 */
export function createWrapLimitWatch(opts: {
  limits: WrapLimits;
  rotate: (tenant: string, version: number) => Promise<{ id: string }>;
  tell: (event: WrapLimitEvent) => void;
  nowMs?: () => number;
}): {
  committed(tenant: string, version: number, count: number): void;
  refused(tenant: string, version: number, count: number): void;
  /** Resolves when no rotation it started is in flight (tests, close). */
  idle(): Promise<void>;
} {
  const nowMs = opts.nowMs ?? (() => Date.now());
  const state = new Map<string, { version: number; retryAt?: number; inFlight?: Promise<void> }>();
  return {
    committed(tenant, version, count) {
      if (count < opts.limits.soft) {
        return;
      }
      const s = state.get(tenant);
      if (
        s?.version === version &&
        (s.inFlight !== undefined || s.retryAt === undefined || nowMs() < s.retryAt)
      ) {
        return; // started (or starting) for this version, or failed and pausing
      }
      const entry: { version: number; retryAt?: number; inFlight?: Promise<void> } = { version };
      state.set(tenant, entry);
      entry.inFlight = opts
        .rotate(tenant, version)
        .then((job) => {
          opts.tell({ tenant, version, wraps: count, outcome: 'rotation_started', job: job.id });
        })
        .catch((err: unknown) => {
          entry.retryAt = nowMs() + RETRY_MS;
          opts.tell({
            tenant,
            version,
            wraps: count,
            outcome: 'rotation_failed',
            error: err instanceof KeyUnavailableError ? err.message : safeName(err),
          });
        })
        .finally(() => {
          delete entry.inFlight;
        });
    },
    refused(tenant, version, count) {
      opts.tell({ tenant, version, wraps: count, outcome: 'refused' });
      // The rotation failed before (or never started here): try again, after its pause.
      this.committed(tenant, version, Math.max(count, opts.limits.soft));
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

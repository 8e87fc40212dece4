/**
 * A generic, append-only hash chain over rows (pure functions, no storage). Each entry is
 * `{ seq, prevHash, hash, event }` with `hash = sha256(prevHash || canonicalJson({ seq, event }))`
 * (hex), `seq` starting at 1 with no gaps, and the first `prevHash` = GENESIS_HASH. A separate
 * head row `{ seq, hash }` (kept outside the chain table) catches the deletion of the last
 * entries, which the links alone cannot. Used for the per-tenant audit chains and the
 * control-plane audit log.
 *
 * What this proves, and what it does not: the hash has no secret, so the chain detects changes
 * by someone who does not recompute it (an accident, a partial edit). Someone with write access
 * to the database can delete or edit an event, recompute every later hash and move the head row,
 * and the chain verifies again. Only a head taken earlier and kept out of that person's reach
 * (a kept anchor, {@link AnchorCheck}) catches that: the rewritten chain no longer holds that
 * hash at that `seq`. A keyed MAC would not help while its key sits on the same host.
 */
import crypto from 'node:crypto';

/** `prevHash` of the first entry, and the anchor hash of an empty chain. */
export const GENESIS_HASH = '0'.repeat(64);

/** One link of a chain. `event` is any canonical-JSON value (no PHI, no secrets). */
export interface ChainEntry<E = unknown> {
  seq: number;
  prevHash: string;
  hash: string;
  event: E;
}

/** The last entry's `seq` and `hash` (`{ seq: 0, hash: GENESIS_HASH }` for an empty chain). */
export interface ChainHead {
  seq: number;
  hash: string;
}

/** What went wrong first, in chain order. */
export type ChainProblem =
  /** An entry's content no longer matches its hash (edited). */
  | 'hash_mismatch'
  /** An entry's `prevHash` is not the previous entry's hash (deleted or reordered). */
  | 'broken_link'
  /** `seq` is not the expected next number (deleted, inserted or reordered). */
  | 'seq_gap'
  /** The head anchor disagrees with the last entry (last entries deleted, or anchor edited). */
  | 'anchor_mismatch'
  /**
   * The chain no longer holds a kept anchor's hash at its `seq`: an entry at or before that
   * `seq` was deleted, edited or reordered and the chain recomputed, or the chain was cut short.
   */
  | 'anchor_not_held';

/** One kept anchor (a head taken earlier) checked against the chain as it is now. */
export interface AnchorCheck {
  seq: number;
  hash: string;
  /** True when the chain still holds exactly this hash at this `seq`. */
  held: boolean;
}

/** Result of a verification. `firstBadSeq` is the first sequence number that fails. */
export interface ChainVerification {
  ok: boolean;
  /** Entries read. */
  count: number;
  firstBadSeq?: number;
  problem?: ChainProblem;
  /** The kept anchors checked, in the order given (only when some were given). */
  anchors?: AnchorCheck[];
}

/**
 * Canonical JSON (RFC 8785 style): object keys sorted by UTF-16 code units, no whitespace,
 * `undefined` object members omitted.
 * @throws TypeError for values JSON cannot represent exactly (NaN, Infinity, bigint,
 *   functions, symbols, `undefined` in arrays).
 */
export function canonicalJson(value: unknown): string {
  if (value === null || typeof value === 'boolean' || typeof value === 'string') {
    return JSON.stringify(value);
  }
  if (typeof value === 'number') {
    if (!Number.isFinite(value)) {
      throw new TypeError('canonicalJson: non-finite number');
    }
    return JSON.stringify(value);
  }
  if (Array.isArray(value)) {
    return `[${value
      .map((v: unknown) => {
        if (v === undefined) {
          throw new TypeError('canonicalJson: undefined in an array');
        }
        return canonicalJson(v);
      })
      .join(',')}]`;
  }
  if (typeof value === 'object') {
    const obj = value as Record<string, unknown>;
    const keys = Object.keys(obj)
      .filter((k) => obj[k] !== undefined)
      .sort();
    return `{${keys.map((k) => `${JSON.stringify(k)}:${canonicalJson(obj[k])}`).join(',')}}`;
  }
  throw new TypeError(`canonicalJson: unsupported ${typeof value}`);
}

/** `sha256(prevHash || canonicalJson({ seq, event }))` as lower-case hex. */
export function chainHash(prevHash: string, seq: number, event: unknown): string {
  return crypto
    .createHash('sha256')
    .update(prevHash, 'utf8')
    .update(canonicalJson({ seq, event }), 'utf8')
    .digest('hex');
}

/** The entry that follows `head` (undefined = empty chain). Pure: the caller stores it. */
export function nextChainEntry<E>(head: ChainHead | undefined, event: E): ChainEntry<E> {
  const prev = head ?? { seq: 0, hash: GENESIS_HASH };
  const seq = prev.seq + 1;
  return { seq, prevHash: prev.hash, hash: chainHash(prev.hash, seq, event), event };
}

/** Incremental verifier for chains read in pages (ascending `seq`). */
export interface ChainVerifier {
  /** Feeds the next entry; returns false once a problem was found (stop reading). */
  push(entry: ChainEntry): boolean;
  /**
   * Ends the walk. `anchor`: the separately stored head; `undefined` skips the anchor check.
   */
  finish(anchor?: ChainHead): ChainVerification;
}

/** Creates an incremental verifier: feed entries in ascending `seq` order, then `finish`. */
export function createChainVerifier(): ChainVerifier {
  let prev: ChainHead = { seq: 0, hash: GENESIS_HASH };
  let count = 0;
  let failure: { seq: number; problem: ChainProblem } | undefined;
  return {
    push(entry) {
      if (failure) {
        return false;
      }
      count += 1;
      const expected = prev.seq + 1;
      if (entry.seq !== expected) {
        failure = { seq: expected, problem: 'seq_gap' };
      } else if (entry.prevHash !== prev.hash) {
        failure = { seq: entry.seq, problem: 'broken_link' };
      } else if (chainHash(entry.prevHash, entry.seq, entry.event) !== entry.hash) {
        failure = { seq: entry.seq, problem: 'hash_mismatch' };
      } else {
        prev = { seq: entry.seq, hash: entry.hash };
      }
      return failure === undefined;
    },
    finish(anchor) {
      if (failure) {
        return { ok: false, count, firstBadSeq: failure.seq, problem: failure.problem };
      }
      if (anchor && (anchor.seq !== prev.seq || anchor.hash !== prev.hash)) {
        return { ok: false, count, firstBadSeq: prev.seq + 1, problem: 'anchor_mismatch' };
      }
      return { ok: true, count };
    },
  };
}

/** Verifies a whole chain held in memory. See `createChainVerifier`. */
export function verifyChain(entries: Iterable<ChainEntry>, anchor?: ChainHead): ChainVerification {
  const verifier = createChainVerifier();
  for (const entry of entries) {
    if (!verifier.push(entry)) {
      break;
    }
  }
  return verifier.finish(anchor);
}

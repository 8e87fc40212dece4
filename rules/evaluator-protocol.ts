/**
 * Messages between the evaluator (main thread) and its evaluation workers, and the shared
 * progress record through which a worker says, without a message, what it is running.
 *
 * A worker posts its outcomes in batches (at the end of a run, or when some time has passed),
 * not one message per let and rule: a call costs the main thread one message instead of
 * dozens. What the main thread needs between messages, to enforce the rule budget and to name
 * what overran it, is in the progress record (shared memory, written by the worker).
 */
import type { LetTraceEntry, RawCard, RulePack, TraceEntry } from './types.ts';

/** The call's input as it crosses to a worker: JSON text, parsed there (cheaper than cloning). */
export interface SerializedInput {
  hook: string;
  hookInstance: string;
  /** `JSON.stringify({ context, prefetch })`. */
  json: string;
  /** The evaluation instant, ms since the epoch. */
  now: number;
}

/** Main -> worker: evaluate `ruleIds` (in order) of the pack with this hash. */
export interface RunMessage {
  type: 'run';
  callId: number;
  hash: string;
  /** Sent when the worker may not have the pack yet (it caches compiled packs by hash). */
  pack?: RulePack;
  input: SerializedInput;
  ruleIds: string[];
  /** Lets that failed or timed out in an earlier attempt of the same call. */
  failedLets: Record<string, string>;
  /**
   * Post each outcome at once (a retry after a timeout or crash: outcomes batched before a
   * rule that hangs would otherwise be lost again and again).
   */
  flushEach: boolean;
  /** Author tools only: summarize let values (EvaluateOptions.traceValues). */
  traceValues?: boolean;
}

/** Main -> worker: compile a pack ahead of use (sent to the spare, so it can take over at once). */
export interface WarmMessage {
  type: 'warm';
  hash: string;
  pack: RulePack;
}

/** Main -> worker. */
export type MainMessage = RunMessage | WarmMessage;

/** Worker -> main. */
export type WorkerMessage =
  | { type: 'ready' }
  | { type: 'need-pack'; callId: number }
  | {
      type: 'batch';
      callId: number;
      lets: LetTraceEntry[];
      rules: Array<{ entry: TraceEntry; card?: RawCard }>;
      /** The run is over: every rule of the message's `ruleIds` has an outcome. */
      end: boolean;
    }
  | { type: 'failed'; callId: number; error: string };

// ---------------------------------------------------------------------------------------------
// The progress record: Int32 [seq, callId, phase, ruleIndex, letIndex, -], then a BigInt64 with
// the start of the current step in µs since the epoch. The worker writes it under a sequence
// lock (seq odd while writing); the main thread reads it when a deadline timer fires.

/** Nothing running yet (the worker is parsing the input or compiling the pack). */
export const PHASE_IDLE = 0;
/** A `let` is being computed: `letIndex` into `Object.keys(pack.let)`, for rule `ruleIndex`. */
export const PHASE_LET = 1;
/** Rule `ruleIndex` of the run's `ruleIds` is running. */
export const PHASE_RULE = 2;
/** The run is over (its last batch is on its way). */
export const PHASE_DONE = 3;

export const PROGRESS_BYTES = 32;

/** A view of a progress record. */
export interface Progress {
  readonly i32: Int32Array;
  readonly start: BigInt64Array;
}

/** Wraps a progress buffer (shared between a worker and the main thread). */
export function progressView(buffer: SharedArrayBuffer): Progress {
  return { i32: new Int32Array(buffer, 0, 6), start: new BigInt64Array(buffer, 24, 1) };
}

/** Now, in ms since the epoch, with sub-millisecond precision (the same clock in every thread). */
export function epochMs(): number {
  return performance.timeOrigin + performance.now();
}

/** Worker side: records the step that starts now. */
export function writeProgress(
  p: Progress,
  callId: number,
  phase: number,
  ruleIndex: number,
  letIndex: number,
): void {
  const seq = Atomics.add(p.i32, 0, 1) + 1; // odd: writing
  Atomics.store(p.i32, 1, callId);
  Atomics.store(p.i32, 2, phase);
  Atomics.store(p.i32, 3, ruleIndex);
  Atomics.store(p.i32, 4, letIndex);
  Atomics.store(p.start, 0, BigInt(Math.round(epochMs() * 1000)));
  Atomics.store(p.i32, 0, seq + 1); // even: consistent
}

/** A consistent snapshot of the progress record. */
export interface ProgressSnapshot {
  callId: number;
  phase: number;
  ruleIndex: number;
  letIndex: number;
  /** Start of the current step, ms since the epoch. */
  startMs: number;
}

/** Main side: reads a consistent snapshot (or the last fields seen, if the writer died mid-write). */
export function readProgress(p: Progress): ProgressSnapshot {
  let snap: ProgressSnapshot = {
    callId: 0,
    phase: PHASE_IDLE,
    ruleIndex: 0,
    letIndex: 0,
    startMs: 0,
  };
  for (let attempt = 0; attempt < 1000; attempt++) {
    const seq = Atomics.load(p.i32, 0);
    snap = {
      callId: Atomics.load(p.i32, 1),
      phase: Atomics.load(p.i32, 2),
      ruleIndex: Atomics.load(p.i32, 3),
      letIndex: Atomics.load(p.i32, 4),
      startMs: Number(Atomics.load(p.start, 0)) / 1000,
    };
    if (seq % 2 === 0 && Atomics.load(p.i32, 0) === seq) {
      return snap;
    }
  }
  return snap;
}

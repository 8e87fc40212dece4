/**
 * Messages between the evaluator (main thread) and its evaluation workers.
 */
import type { EvaluationInput, LetTraceEntry, RawCard, RulePack, TraceEntry } from './types.ts';

/** Main -> worker: evaluate `ruleIds` (in order) of the pack with this hash. */
export interface RunMessage {
  type: 'run';
  callId: number;
  hash: string;
  /** Sent when the worker may not have the pack yet (it caches compiled packs by hash). */
  pack?: RulePack;
  input: EvaluationInput;
  ruleIds: string[];
  /** Lets that failed or timed out in an earlier attempt of the same call. */
  failedLets: Record<string, string>;
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
  | { type: 'begin'; callId: number }
  | { type: 'let-start'; callId: number; name: string }
  | { type: 'let'; callId: number; entry: LetTraceEntry }
  | { type: 'rule'; callId: number; entry: TraceEntry; card?: RawCard }
  | { type: 'end'; callId: number }
  | { type: 'failed'; callId: number; error: string };

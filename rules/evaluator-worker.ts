/**
 * Entry point of an evaluation worker (worker_threads). Compiles packs on first use (cached
 * by hash) and evaluates rule by rule. It records each step it starts (a rule, a let) in the
 * shared progress record, so that the main thread can attribute a timeout and terminate this
 * worker if needed, and posts outcomes in batches: at the end of the run, or as soon as
 * `FLUSH_MS` have passed since the last batch (slow rules are reported promptly; a worker that
 * is terminated loses only outcomes of the last few milliseconds, which the replacement
 * recomputes identically). A retry of a call posts every outcome at once.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { cachedProgram, programFor } from './compile-pack.ts';
import type { PackProgram } from './compile-pack.ts';
import { runRules } from './evaluate-core.ts';
import type { MainMessage, RunMessage, WorkerMessage } from './evaluator-protocol.ts';
import type { WarmedMessage } from './evaluator.ts';
import {
  PHASE_DONE,
  PHASE_IDLE,
  PHASE_LET,
  PHASE_RULE,
  PROGRESS_BYTES,
  progressView,
  writeProgress,
} from './evaluator-protocol.ts';
import { isKnownFunction } from './expression.ts';
import type { EvaluationInput, LetTraceEntry, RawCard, TraceEntry } from './types.ts';

const port = parentPort;
if (!port) {
  throw new Error('evaluator-worker must run in a worker thread');
}
const given = (workerData as { progress?: unknown } | null)?.progress;
// Without a shared buffer (a worker started by hand) progress is recorded where no one reads it.
const progress = progressView(
  given instanceof SharedArrayBuffer ? given : new SharedArrayBuffer(PROGRESS_BYTES),
);

/** Outcomes are batched; a batch goes out at the latest this long after the previous one. */
const FLUSH_MS = 10;

// Nothing evaluated here may reach a log: call data is PHI.
for (const level of ['log', 'info', 'warn', 'error', 'debug', 'trace'] as const) {
  console[level] = () => undefined;
}

function post(msg: WorkerMessage | WarmedMessage): void {
  port?.postMessage(msg);
}

function parseInput(msg: RunMessage): EvaluationInput {
  const { context, prefetch } = JSON.parse(msg.input.json) as {
    context: Record<string, unknown>;
    prefetch: Record<string, unknown>;
  };
  return {
    hook: msg.input.hook,
    hookInstance: msg.input.hookInstance,
    context,
    prefetch,
    now: new Date(msg.input.now),
  };
}

function handle(msg: RunMessage): void {
  const { callId } = msg;
  writeProgress(progress, callId, PHASE_IDLE, 0, 0);
  let program: PackProgram | undefined = cachedProgram(msg.hash);
  if (!program) {
    if (!msg.pack) {
      post({ type: 'need-pack', callId });
      return;
    }
    try {
      program = programFor(msg.hash, msg.pack);
    } catch {
      post({ type: 'failed', callId, error: 'the pack does not compile' });
      return;
    }
  }
  let input: EvaluationInput;
  try {
    input = parseInput(msg);
  } catch {
    post({ type: 'failed', callId, error: 'input cannot be passed to the evaluation worker' });
    return;
  }
  const letIndex = new Map(Object.keys(program.pack.let ?? {}).map((name, i) => [name, i]));
  let lets: LetTraceEntry[] = [];
  let rules: Array<{ entry: TraceEntry; card?: RawCard }> = [];
  let lastFlush = performance.now();
  let ruleIndex = 0;
  const flush = (end: boolean) => {
    post({ type: 'batch', callId, lets, rules, end });
    lets = [];
    rules = [];
    lastFlush = performance.now();
  };
  const maybeFlush = () => {
    if (msg.flushEach || performance.now() - lastFlush >= FLUSH_MS) {
      flush(false);
    }
  };
  try {
    runRules(
      program,
      input,
      msg.ruleIds,
      {
        onRuleStart: (index) => {
          ruleIndex = index;
          writeProgress(progress, callId, PHASE_RULE, index, 0);
        },
        onLetStart: (name) => {
          writeProgress(progress, callId, PHASE_LET, ruleIndex, letIndex.get(name) ?? -1);
        },
        onLet: (entry) => {
          lets.push(entry);
          // The rest of the rule is a new step (the let's time is not charged to it).
          writeProgress(progress, callId, PHASE_RULE, ruleIndex, 0);
          maybeFlush();
        },
        onRule: (entry, card) => {
          rules.push(card ? { entry, card } : { entry });
          maybeFlush();
        },
        ...(msg.traceValues === true ? { traceValues: true } : {}),
      },
      msg.failedLets,
    );
  } catch {
    post({ type: 'failed', callId, error: 'evaluation failed' });
    return;
  }
  writeProgress(progress, callId, PHASE_DONE, ruleIndex, 0);
  flush(true);
}

port.on('message', (msg: MainMessage) => {
  if (msg.type === 'warm') {
    try {
      programFor(msg.hash, msg.pack);
    } catch {
      // reported when the pack is run
    }
    // The pool takes no call to this worker until then (see WorkerPool.pumpWarm).
    post({ type: 'warmed', hash: msg.hash });
    return;
  }
  handle(msg);
});

// Warm the function probe so the first call does not pay for it.
isKnownFunction('exists');
post({ type: 'ready' });

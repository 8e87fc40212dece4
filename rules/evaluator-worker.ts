/**
 * Entry point of an evaluation worker (worker_threads). Compiles packs on first use (cached
 * by hash) and evaluates rule by rule, posting each let and rule outcome as it completes so
 * that the main thread can attribute a timeout and terminate this worker if needed.
 */
import { parentPort } from 'node:worker_threads';
import { cachedProgram, programFor } from './compile-pack.ts';
import type { PackProgram } from './compile-pack.ts';
import { runRules } from './evaluate-core.ts';
import type { MainMessage, RunMessage, WorkerMessage } from './evaluator-protocol.ts';
import { isKnownFunction } from './expression.ts';

const port = parentPort;
if (!port) {
  throw new Error('evaluator-worker must run in a worker thread');
}

// Nothing evaluated here may reach a log: call data is PHI.
for (const level of ['log', 'info', 'warn', 'error', 'debug', 'trace'] as const) {
  console[level] = () => undefined;
}

function post(msg: WorkerMessage): void {
  port?.postMessage(msg);
}

function handle(msg: RunMessage): void {
  const { callId } = msg;
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
  post({ type: 'begin', callId });
  try {
    runRules(
      program,
      msg.input,
      msg.ruleIds,
      {
        onLetStart: (name) => {
          post({ type: 'let-start', callId, name });
        },
        onLet: (entry) => {
          post({ type: 'let', callId, entry });
        },
        onRule: (entry, card) => {
          post(card ? { type: 'rule', callId, entry, card } : { type: 'rule', callId, entry });
        },
      },
      msg.failedLets,
    );
  } catch {
    post({ type: 'failed', callId, error: 'evaluation failed' });
    return;
  }
  post({ type: 'end', callId });
}

port.on('message', (msg: MainMessage) => {
  if (msg.type === 'warm') {
    try {
      programFor(msg.hash, msg.pack);
    } catch {
      // reported when the pack is run
    }
    return;
  }
  handle(msg);
});

// Warm the function probe so the first call does not pay for it.
isKnownFunction('exists');
post({ type: 'ready' });

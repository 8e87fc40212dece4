/**
 * Validation of an uploaded pack off the calling thread. Validating and compiling a large or
 * hostile pack is synchronous work that can take seconds (a 2,000-rule pack held the event
 * loop for 12.8 s), so the server runs it in a one-off worker thread with a heap limit and a
 * wall-clock limit, terminated on overrun. The answer is the same as `validatePack(raw,
 * { runTests: false })`'s: the same validated pack, or the same problems.
 */
import { Worker } from 'node:worker_threads';
import { deepFreeze } from './compile-pack.ts';
import { PackCheckUnavailableError, PackLimitError, PackValidationError } from './errors.ts';
import type { PackCheckLimit } from './errors.ts';
import { workerBootstrapCode } from './evaluator.ts';
import type { CompiledPack, PackProblem, RulePack } from './types.ts';

/** Limits of one pack's validation worker. */
export interface PackCheckOptions {
  /** Wall-clock time of the validation (ms), from the moment the worker has the pack. */
  timeoutMs?: number;
  /** Heap of the worker (MB, V8 old generation); a pack that needs more is refused. */
  memoryMb?: number;
  /** Time the worker may take to start (ms); past it the check is unavailable (not the pack's fault). */
  startTimeoutMs?: number;
  /**
   * Not the worker's: whether the upload's tests must fire every rule of the pack
   * (`RunPackTestsOptions.onUncovered`). `AdminService` reads it; default true.
   */
  requireTestCoverage?: boolean;
}

/**
 * 20 s (as an upload's tests) and 512 MB (as an evaluation worker). The largest shipped pack
 * validates in well under a second; a generated 3,000-rule pack takes a few seconds.
 */
export const PACK_CHECK_DEFAULTS = Object.freeze({
  timeoutMs: 20_000,
  memoryMb: 512,
  startTimeoutMs: 60_000,
});

/**
 * What to check: a pack already parsed (`raw`), or its text as uploaded, parsed in the worker
 * as `parsePackText(text, format)` does (a YAML document of a few hundred KB takes about a
 * second to parse: that too stays off the calling thread).
 */
export type PackCheckInput = { raw: unknown } | { text: string; format?: 'json' | 'yaml' };

/** Main thread -> worker: the one pack to check. */
export type PackCheckRequest = PackCheckInput;

/** Worker -> main thread. */
export type PackCheckReply =
  | { type: 'ready' }
  | { type: 'valid'; id: string; version: string; hash: string; pack: RulePack }
  | { type: 'invalid'; problems: PackProblem[]; total: number }
  | { type: 'failed' };

const WORKER_URL = new URL('./pack-check-worker.ts', import.meta.url);

/** The problem message of a pack whose validation hit a limit (what the pack author reads). */
export function packLimitMessage(limit: PackCheckLimit, value: number): string {
  return limit === 'time'
    ? `validating the pack took more than ${value / 1000} s, the server's limit for one pack; split the pack or simplify its expressions`
    : `validating the pack needed more than ${value} MB of memory, the server's limit for one pack; split the pack`;
}

/**
 * Parses (`{ text, format }`), validates and compiles a pack (native or PlanDefinition; no
 * embedded tests run) in a worker thread of its own, under `opts` (defaults
 * {@link PACK_CHECK_DEFAULTS}). The calling thread only copies the input to the worker and the
 * validated pack back. The worker is terminated once it has answered, or as soon as a limit
 * is passed.
 * @returns the validated pack (frozen), as `validatePack` would return it.
 * @throws PackValidationError with the same problems as `parsePackText` and `validatePack`
 *   (with `runTests: false`); PackLimitError (a PackValidationError, one problem at `(pack)`)
 *   when the time or heap limit was hit; PackCheckUnavailableError when the worker did not
 *   start or stopped without an answer; RangeError for a limit that is not positive; Error if
 *   validation failed unexpectedly.
 */
export function validatePackInWorker(
  input: PackCheckInput,
  opts: PackCheckOptions = {},
): Promise<CompiledPack> {
  const timeoutMs = opts.timeoutMs ?? PACK_CHECK_DEFAULTS.timeoutMs;
  const memoryMb = opts.memoryMb ?? PACK_CHECK_DEFAULTS.memoryMb;
  const startTimeoutMs = opts.startTimeoutMs ?? PACK_CHECK_DEFAULTS.startTimeoutMs;
  if (!(timeoutMs > 0) || !(memoryMb > 0) || !(startTimeoutMs > 0)) {
    return Promise.reject(new RangeError('pack check limits must be positive'));
  }
  return new Promise<CompiledPack>((resolve, reject) => {
    let worker: Worker;
    try {
      worker = new Worker(workerBootstrapCode(WORKER_URL), {
        eval: true,
        resourceLimits: { maxOldGenerationSizeMb: memoryMb },
      });
    } catch (err) {
      reject(new PackCheckUnavailableError('the pack-check worker did not start', { cause: err }));
      return;
    }
    let sent = false;
    let settled = false;
    let timer: NodeJS.Timeout | undefined = setTimeout(() => {
      settle(new PackCheckUnavailableError('the pack-check worker did not start in time'));
    }, startTimeoutMs);

    function settle(outcome: CompiledPack | Error): void {
      if (settled) {
        return;
      }
      settled = true;
      clearTimeout(timer);
      timer = undefined;
      // Whatever it was doing, the worker is done: its heap goes with it.
      void worker.terminate();
      if (outcome instanceof Error) {
        reject(outcome);
      } else {
        resolve(outcome);
      }
    }

    worker.on('message', (msg: PackCheckReply) => {
      switch (msg.type) {
        case 'ready':
          if (sent) {
            return;
          }
          sent = true;
          clearTimeout(timer);
          try {
            worker.postMessage(input satisfies PackCheckRequest);
          } catch (err) {
            settle(err instanceof Error ? err : new Error('the pack cannot be copied'));
            return;
          }
          timer = setTimeout(() => {
            settle(new PackLimitError('time', packLimitMessage('time', timeoutMs)));
          }, timeoutMs);
          return;
        case 'valid':
          settle(
            Object.freeze({
              id: msg.id,
              version: msg.version,
              hash: msg.hash,
              pack: deepFreeze(msg.pack),
            }),
          );
          return;
        case 'invalid':
          settle(new PackValidationError(msg.problems, { total: msg.total }));
          return;
        case 'failed':
          settle(new Error('pack validation failed unexpectedly in its worker'));
          return;
      }
    });
    worker.on('error', (err: Error & { code?: unknown }) => {
      if (sent && err.code === 'ERR_WORKER_OUT_OF_MEMORY') {
        settle(new PackLimitError('memory', packLimitMessage('memory', memoryMb)));
        return;
      }
      settle(
        new PackCheckUnavailableError(
          sent ? 'the pack-check worker failed' : 'the pack-check worker did not start',
          { cause: err },
        ),
      );
    });
    worker.on('exit', () => {
      settle(new PackCheckUnavailableError('the pack-check worker stopped without an answer'));
    });
  });
}

/**
 * Entry point of a pack-check worker (worker_threads): one per upload, started by
 * `validatePackInWorker` (pack-check.ts) and terminated after its one answer. It parses (if sent
 * text), validates and compiles the pack it is sent, exactly as `parsePackText` and
 * `validatePack(raw, { runTests: false })` do in the calling thread, and posts the validated
 * pack (or its problems) back. Its heap is bounded by
 * the worker's `resourceLimits` and its time by the main thread, which terminates it on overrun.
 */
import { parentPort } from 'node:worker_threads';
import { PackValidationError } from './errors.ts';
import type { PackCheckReply, PackCheckRequest } from './pack-check.ts';
import { parsePackText } from './pack-format.ts';
import { validatePack } from './validate-pack.ts';

const port = parentPort;
if (!port) {
  throw new Error('pack-check-worker must run in a worker thread');
}

// Nothing validated here may reach a log: a pack's tests can carry patient-like data.
for (const level of ['log', 'info', 'warn', 'error', 'debug', 'trace'] as const) {
  console[level] = () => undefined;
}

function post(msg: PackCheckReply): void {
  port?.postMessage(msg);
}

/** The answer to one request: a syntax error in its text is a problem like any other. */
async function check(msg: PackCheckRequest): Promise<PackCheckReply> {
  try {
    const raw = 'text' in msg ? parsePackText(msg.text, msg.format) : msg.raw;
    const compiled = await validatePack(raw, { runTests: false });
    return {
      type: 'valid',
      id: compiled.id,
      version: compiled.version,
      hash: compiled.hash,
      pack: compiled.pack,
    };
  } catch (err) {
    return err instanceof PackValidationError
      ? { type: 'invalid', problems: err.problems, total: err.total }
      : { type: 'failed' };
  }
}

port.once('message', (msg: PackCheckRequest) => {
  void check(msg).then(post);
});

post({ type: 'ready' });

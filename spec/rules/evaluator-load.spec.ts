import { expect } from 'chai';
import { compilePack, createEvaluator } from '../../rules/index.ts';
import type { EvaluationInput, Evaluator, PackRule, RulePack } from '../../rules/index.ts';

/** A ten-item collection; nesting `select` over it multiplies: 10^7 items take many seconds. */
const DIGITS = '(0|1|2|3|4|5|6|7|8|9)';
const SLOW = `${DIGITS}.select(${DIGITS}.select(${DIGITS}.select(${DIGITS}.select(${DIGITS}.select(${DIGITS}.select(${DIGITS})))))).count() > 0`;

function pack(when: string): RulePack {
  const rule: PackRule = {
    id: 'r1',
    service: 'svc',
    when,
    card: { summary: 'card', indicator: 'info', source: { label: 'specs' } },
  };
  return {
    id: 'load-pack',
    version: '1.0.0',
    title: 'Load pack',
    publisher: 'specs',
    description: 'Worker pool load',
    services: [{ id: 'svc', hook: 'patient-view', description: 'main service' }],
    rules: [rule],
  };
}

const input = (): EvaluationInput => ({
  hook: 'patient-view',
  hookInstance: '0f8f3a55-1d2b-4f7e-9f8e-4a6a3c5d7e90',
  now: new Date('2024-02-29T10:15:00.000Z'),
  context: { userId: 'Practitioner/1', patientId: 'p1' },
  prefetch: {},
});

async function until(what: string, ok: () => boolean, ms = 10_000): Promise<void> {
  const end = Date.now() + ms;
  while (!ok()) {
    if (Date.now() > end) {
      throw new Error(`timed out waiting for ${what}`);
    }
    await new Promise((r) => setTimeout(r, 5));
  }
}

/**
 * The worker pool's load, for metrics (server/metrics.ts reads `stats()` on each scrape): the
 * pool's size, the workers running a call, the calls waiting for one, and the workers that
 * exited on their own.
 */
describe('rules: evaluator pool load and crashes', function () {
  this.timeout(60_000);
  let ev: Evaluator | undefined;
  afterEach(async () => {
    await ev?.close();
    ev = undefined;
  });

  it('counts busy workers and calls waiting for one, back to zero once the calls end', async () => {
    ev = createEvaluator({ workers: 1, ruleBudgetMs: 300, callBudgetMs: 5_000 });
    await ev.ready();
    expect(ev.stats()).to.include({ workers: 1, busyWorkers: 0, queuedCalls: 0 });
    const compiled = compilePack(pack(SLOW));
    const evaluator = ev;
    const calls = [
      evaluator.evaluate(compiled, 'svc', input()),
      evaluator.evaluate(compiled, 'svc', input()),
    ];
    await until('one busy worker and one queued call', () => {
      const s = evaluator.stats();
      return s.busyWorkers === 1 && s.queuedCalls === 1;
    });
    const results = await Promise.all(calls);
    expect(results.map((r) => r.trace[0]?.status)).to.deep.equal(['timeout', 'timeout']);
    // The overrunning workers were stopped by the pool: replaced, not crashed.
    expect(ev.stats()).to.include({
      busyWorkers: 0,
      queuedCalls: 0,
      workersReplaced: 2,
      workersCrashed: 0,
    });
  });

  it('counts a worker that dies during a call (out of heap) as crashed and replaced', async () => {
    ev = createEvaluator({
      workers: 1,
      ruleBudgetMs: 20_000,
      callBudgetMs: 30_000,
      workerMemoryMb: 64,
    });
    await ev.ready();
    const result = await ev.evaluate(compilePack(pack(SLOW)), 'svc', input());
    expect(result.trace[0]).to.include({ status: 'error', error: 'evaluation worker stopped' });
    expect(ev.stats()).to.include({ workersCrashed: 1, workersReplaced: 1, busyWorkers: 0 });
  });
});

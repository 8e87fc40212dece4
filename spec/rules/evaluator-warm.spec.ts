/**
 * Compiling a pack ahead (`evaluator.warm`: after an upload, a subscription change, the pack
 * watcher on every replica) takes one worker out of service at a time: the calls of other
 * packs keep being answered by the others, within their budget.
 */
import { expect } from 'chai';
import { compilePack, createEvaluator } from '../../rules/index.ts';
import type { CompiledPack, EvaluationInput, Evaluator, RulePack } from '../../rules/index.ts';
import { slowPack } from '../helpers/slow-pack.ts';

const CARD = { summary: 's', indicator: 'info', source: { label: 'x' } } as const;

/**
 * A valid pack of `rules` distinct rules and a value set of `codes` codes, about 3 MB of JSON:
 * a worker takes seconds to compile it on a loaded 2-core machine, and evaluates it fast.
 */
function bigPack(id: string, rules = 600, codes = 40_000): RulePack {
  return {
    id,
    version: '1.0.0',
    title: 't',
    publisher: 'p',
    description: 'd',
    services: [{ id: 'svc', hook: 'patient-view', description: 'd' }],
    valueSets: {
      vs: {
        codes: Array.from({ length: codes }, (_, i) => ({
          system: 'http://loinc.org',
          code: `c${i}-${id}`,
          display: `Code ${i}`,
        })),
      },
    },
    rules: Array.from({ length: rules }, (_, i) => ({
      id: `r${i}`,
      title: `R ${i}`,
      service: 'svc',
      when: `%patient.name.where(family = 'F${i}').given.first().contains('zz${i}')`,
      card: CARD,
    })),
  };
}

function input(): EvaluationInput {
  return {
    hook: 'patient-view',
    hookInstance: crypto.randomUUID(),
    context: { patientId: 'p', userId: 'Practitioner/u' },
    prefetch: { patient: { resourceType: 'Patient', id: 'p' } },
    now: new Date(),
  };
}

/** Whether a rule ran to its end (fired or not). */
const ran = (status: string) => status === 'fired' || status === 'not-fired';

/** Until `done()`, or fails after `ms`. */
async function until(what: string, done: () => boolean, ms = 40_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!done()) {
    expect(Date.now(), `timed out waiting for ${what}`).to.be.below(deadline);
    await new Promise((r) => setTimeout(r, 5));
  }
}

/** Runs two calls of `small` at once, twice, so that both workers have compiled it. */
async function warmUp(ev: Evaluator, small: CompiledPack): Promise<void> {
  for (let i = 0; i < 3; i++) {
    await Promise.all([ev.evaluate(small, 'svc', input()), ev.evaluate(small, 'svc', input())]);
  }
}

describe('compiling a pack ahead in the evaluation workers (warm)', function () {
  this.timeout(60_000);
  // Far above a warm call of the small pack (a few ms), far below the big pack's compilation.
  const CALL_BUDGET_MS = 1000;
  let big: CompiledPack;

  before(() => {
    big = compilePack(bigPack('warm-big'));
    expect(JSON.stringify(big.pack).length).to.be.above(2_500_000);
  });

  it('other packs keep being answered, none skipped or over its budget, while a big pack warms', async () => {
    const ev = createEvaluator({ workers: 2, callBudgetMs: CALL_BUDGET_MS, inlineSliceMs: 0 });
    try {
      await ev.ready();
      const small = compilePack(slowPack(0, 1, 'warm-small'));
      ev.warm(small);
      await warmUp(ev, small);
      await until('the small pack warmed', () => (ev.stats().warmsPending ?? 0) === 0, 10_000);
      const before = ev.stats();

      ev.warm(big);
      const results: Array<{ ms: number; statuses: string[] }> = [];
      const maxWarming = { n: 0 };
      const stream = async () => {
        // Calls for as long as the warm lasts (at least a few, even if it is quick).
        while (results.length < 10 || (ev.stats().warmsPending ?? 0) > 0) {
          const r = await ev.evaluate(small, 'svc', input());
          maxWarming.n = Math.max(maxWarming.n, ev.stats().warmingWorkers ?? 0);
          results.push({ ms: r.durationMs, statuses: r.trace.map((t) => t.status) });
          await new Promise((resolve) => setTimeout(resolve, 5));
          expect(results.length, 'calls while the big pack warms').to.be.below(20_000);
        }
      };
      await Promise.all([stream(), stream()]);

      const bad = results.filter((r) => r.statuses.some((s) => !ran(s)));
      expect(bad, 'calls with a check not run').to.deep.equal([]);
      const slowest = Math.max(...results.map((r) => r.ms));
      expect(slowest, 'slowest call (ms)').to.be.below(CALL_BUDGET_MS);
      const after = ev.stats();
      expect(after.workersReplaced, 'workers replaced').to.equal(before.workersReplaced);
      expect(after.compileOverruns, 'compile overruns').to.equal(0);
      expect(maxWarming.n, 'workers warming at once').to.equal(1);
      expect(after.warmingWorkers).to.equal(0);
    } finally {
      await ev.close();
    }
  });

  it('compiles it in one worker at a time, the spare first, and every worker has it after', async () => {
    const ev = createEvaluator({ workers: 2, callBudgetMs: 10_000, inlineSliceMs: 0 });
    try {
      await ev.ready();
      const seen: number[] = [];
      const busy: number[] = [];
      ev.warm(big);
      await until('the warm done', () => {
        const s = ev.stats();
        seen.push(s.warmingWorkers ?? -1);
        busy.push(s.busyWorkers ?? -1);
        return s.warmsPending === 0;
      });
      expect(Math.max(...seen), 'workers warming at once').to.equal(1);
      // The spare first: the serving workers start later, and a warming one counts as busy.
      expect(busy[0], 'serving workers busy right after warm()').to.equal(0);
      expect(Math.max(...busy), 'serving workers busy while warming').to.equal(1);
      expect(ev.stats().warmed, 'worker compilations ahead').to.equal(3);
      // Every serving worker has it: two calls at once, neither compiles it.
      const slowCompile = ev.stats().compileOverruns;
      const rs = await Promise.all([
        ev.evaluate(big, 'svc', input()),
        ev.evaluate(big, 'svc', input()),
      ]);
      for (const r of rs) {
        expect(r.trace.every((t) => ran(t.status))).to.equal(true);
      }
      expect(ev.stats().compileOverruns).to.equal(slowCompile);
    } finally {
      await ev.close();
    }
  });

  it('a call of the pack being warmed compiles it on a free worker, within its budget', async () => {
    const ev = createEvaluator({ workers: 2, callBudgetMs: 20_000, inlineSliceMs: 0 });
    try {
      await ev.ready();
      const other = compilePack(bigPack('warm-other', 300, 20_000));
      ev.warm(other);
      const r = await ev.evaluate(other, 'svc', input());
      expect(r.trace.every((t) => ran(t.status))).to.equal(true);
      await until('the warm done', () => (ev.stats().warmsPending ?? 0) === 0);
      expect(ev.stats().workersReplaced).to.equal(0);
    } finally {
      await ev.close();
    }
  });
});

describe('evaluator worker pool: replaced and crashed workers', function () {
  this.timeout(60_000);

  it('workers replaced for overrunning a rule budget are not failed starts: ready() still resolves', async () => {
    // Three rules of ~50 ms under a 20 ms rule budget: three replacements in one call. They
    // used to count as three failed starts, after which ready() rejected every waiter.
    const ev = createEvaluator({
      workers: 2,
      callBudgetMs: 5000,
      ruleBudgetMs: 20,
      inlineSliceMs: 0,
    });
    try {
      await ev.ready();
      const result = await ev.evaluate(compilePack(slowPack(3, 1, 'replaced-3')), 'svc', input());
      expect(
        result.trace.filter((t) => t.ruleId.startsWith('slow-')).map((t) => t.status),
      ).to.deep.equal(['timeout', 'timeout', 'timeout']);
      expect(ev.stats().workersReplaced).to.be.at.least(3);
      await ev.ready();
      const after = await ev.evaluate(
        compilePack(slowPack(0, 1, 'after-replaced')),
        'svc',
        input(),
      );
      expect(after.trace.every((t) => ran(t.status))).to.equal(true);
    } finally {
      await ev.close();
    }
  });

  it('a pack warmed while workers are still starting reaches every worker once they are ready', async () => {
    const ev = createEvaluator({ workers: 2, callBudgetMs: 5000, inlineSliceMs: 0 });
    try {
      ev.warm(compilePack(bigPack('warm-early', 50, 1000))); // before ready(): nothing started yet
      await ev.ready();
      // The spare and both serving workers: it used to be dropped when no worker was ready.
      await until('three workers warmed', () => ev.stats().warmed === 3);
      expect(ev.stats().warmsPending).to.equal(0);
    } finally {
      await ev.close();
    }
  });

  it('a pack whose compilation ahead kills its worker (out of memory) is not warmed again', async () => {
    const ev = createEvaluator({
      workers: 2,
      callBudgetMs: 2000,
      inlineSliceMs: 0,
      workerMemoryMb: 24,
    });
    try {
      await ev.ready();
      const small = compilePack(slowPack(0, 1, 'oom-small'));
      await ev.evaluate(small, 'svc', input());
      ev.warm(compilePack(bigPack('oom-big')));
      await until(
        'the warm to end',
        () => (ev.stats().warmsPending ?? 0) === 0 && (ev.stats().warmingWorkers ?? 0) === 0,
      );
      const crashed = ev.stats().workersCrashed;
      await new Promise((r) => setTimeout(r, 3000));
      // Calls of the other pack are answered all along, and no worker dies on it again.
      const r = await ev.evaluate(small, 'svc', input());
      expect(r.trace.every((t) => ran(t.status))).to.equal(true);
      expect(ev.stats().workersCrashed).to.equal(crashed);
      expect(crashed).to.be.at.most(1);
    } finally {
      await ev.close();
    }
  });
});

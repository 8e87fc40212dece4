/**
 * A pack whose embedded tests pass at upload must also fit the live call budget. The tests
 * run under a generous call budget (their fresh worker compiles the pack inside the first
 * call), so `runPackTests` with `liveCallBudgetMs` then measures each test's evaluation warm
 * (its rules' and lets' own durations, compiling excluded; the best of several runs) and fails
 * the first test over the live budget, naming the test, the time, the budget and the slowest
 * rules. Half the budget or more is a warning.
 */
import { expect } from 'chai';
import {
  compilePack,
  createEvaluator,
  PackValidationError,
  runPackTests,
  validatePack,
} from '../../rules/index.ts';
import type {
  CompiledPack,
  EvaluationInput,
  EvaluationResult,
  Evaluator,
  EvaluatorBudgets,
  EvaluatorStats,
} from '../../rules/index.ts';
import { slowPack } from '../helpers/slow-pack.ts';
import { shippedPackRaw } from '../helpers/test-app.ts';

/**
 * An evaluator whose rule durations are scripted, call by call (`durations[call][rule]`, in
 * the pack's rule order; the last row repeats), so that the decision (best of several runs,
 * when to run again, warn or refuse) is checked without depending on the machine's speed.
 */
class ScriptedEvaluator implements Evaluator {
  calls = 0;
  constructor(
    private readonly durations: number[][],
    private readonly letMs = 0,
  ) {}

  evaluate(
    pack: CompiledPack,
    serviceId: string,
    input: EvaluationInput,
  ): Promise<EvaluationResult> {
    const row = this.durations[Math.min(this.calls, this.durations.length - 1)] ?? [];
    this.calls++;
    const ids = pack.pack.rules.filter((r) => r.service === serviceId).map((r) => r.id);
    const quick = input.context.patientId === 'p';
    return Promise.resolve({
      pack: { id: pack.id, version: pack.version, hash: pack.hash },
      service: serviceId,
      cards: [],
      trace: ids.map((ruleId, i) => {
        const fired = ruleId === 'quick' && quick;
        return { ruleId, status: fired ? 'fired' : 'not-fired', fired, durationMs: row[i] ?? 0 };
      }),
      durationMs: row.reduce((a, b) => a + b, 0) + this.letMs,
      lets: [{ name: 'x', status: 'ok', durationMs: this.letMs }],
    });
  }

  ready(): Promise<void> {
    return Promise.resolve();
  }

  warm(): void {
    // Nothing to compile.
  }

  close(): Promise<void> {
    return Promise.resolve();
  }

  stats(): EvaluatorStats {
    return { workersStarted: 0, workersReplaced: 0, calls: this.calls };
  }

  budgets(): EvaluatorBudgets {
    return { callBudgetMs: 10_000, ruleBudgetMs: 500 };
  }
}

describe('rules: embedded pack tests against the live call budget', function () {
  this.timeout(120_000);

  describe('the decision (scripted durations)', () => {
    const pack = compilePack(slowPack(3, 2));

    it('fails the first test whose every run is over the live budget, naming test, time, budget and slowest rules', async () => {
      const ev = new ScriptedEvaluator([[0.1, 120, 300, 90]], 5);
      const results = await runPackTests(pack, ev, { liveCallBudgetMs: 300 });
      expect(results[0]!.passed).to.equal(false);
      expect(results[0]!.failures).to.deep.equal([
        "test 'case 1' takes 515 ms to evaluate (best of 4 runs, compiling excluded), over the live call budget of 300 ms: " +
          'live calls would skip rules. Slowest: slow-2 (Slow check 2) 300 ms, slow-1 (Slow check 1) 120 ms, slow-3 (Slow check 3) 90 ms',
      ]);
      expect(results[0]!.evaluationMs).to.be.closeTo(515.1, 1e-9);
      // Measuring stops at the first refusal: the second test ran once, as a test.
      expect(results[1]!.passed).to.equal(true);
      expect(ev.calls).to.equal(2 + 3);
    });

    it('passes a test whose first run was slow but a warm run fits (no refusal for a spike)', async () => {
      const ev = new ScriptedEvaluator([
        [0.1, 900, 900, 900],
        [0.1, 1, 1, 1],
      ]);
      const results = await runPackTests(pack, ev, { liveCallBudgetMs: 300 });
      expect(results.map((r) => r.passed)).to.deep.equal([true, true]);
      expect(results.map((r) => r.warnings ?? [])).to.deep.equal([[], []]);
      expect(results[0]!.evaluationMs).to.be.closeTo(3.1, 1e-9);
    });

    it('never runs a test again when its run used at most half the budget', async () => {
      const ev = new ScriptedEvaluator([[1.5, 1.5, 1.5, 1.5]]);
      const results = await runPackTests(pack, ev, { liveCallBudgetMs: 12 });
      expect(results.map((r) => r.passed)).to.deep.equal([true, true]);
      expect(results.map((r) => r.warnings)).to.deep.equal([undefined, undefined]);
      expect(ev.calls).to.equal(2);
    });

    it('warns (does not fail) when the best run is over half the budget', async () => {
      const ev = new ScriptedEvaluator([[0.1, 100, 100, 20]]);
      const results = await runPackTests(pack, ev, { liveCallBudgetMs: 300 });
      expect(results.map((r) => r.passed)).to.deep.equal([true, true]);
      expect(results[1]!.warnings).to.deep.equal([
        "test 'case 2' takes 220 ms to evaluate (best of 4 runs, compiling excluded), over half the live call budget of 300 ms. " +
          'Slowest: slow-1 (Slow check 1) 100 ms, slow-2 (Slow check 2) 100 ms, slow-3 (Slow check 3) 20 ms',
      ]);
    });

    it('validatePack hands the warnings to onWarning with the test path (pack validate prints them)', async () => {
      const warnings: string[] = [];
      const raw = slowPack(3, 2);
      await validatePack(raw, {
        evaluator: new ScriptedEvaluator([[0.1, 100, 100, 20]]),
        liveCallBudgetMs: 300,
        onWarning: (w) => warnings.push(w),
      });
      expect(warnings).to.have.length(2);
      expect(warnings[0]).to.match(
        /^tests\[0\]: test 'case 1' takes 220 ms to evaluate .*over half the live call budget of 300 ms\./,
      );
      expect(warnings[1]).to.match(/^tests\[1\]: test 'case 2' takes 220 ms/);
    });

    it('measures nothing when a test failed (the pack is refused anyway)', async () => {
      const ev = new ScriptedEvaluator([[0.1, 900, 900, 900]]);
      const failing = compilePack({
        ...slowPack(3, 2, 'failing'),
        tests: slowPack(3, 2).tests!.map((t) => ({ ...t, expect: { fire: ['slow-1'] } })),
      });
      const results = await runPackTests(failing, ev, { liveCallBudgetMs: 300 });
      expect(ev.calls).to.equal(2);
      expect(
        results.every((r) => r.failures.every((f) => !f.includes('live call budget'))),
      ).to.equal(true);
    });

    it('with no live budget, measures nothing (the local tools without a server config)', async () => {
      const ev = new ScriptedEvaluator([[0.1, 900, 900, 900]]);
      const results = await runPackTests(pack, ev);
      expect(results.map((r) => r.passed)).to.deep.equal([true, true]);
      expect(ev.calls).to.equal(2);
    });

    it('rejects a live budget that is not positive', async () => {
      const ev = new ScriptedEvaluator([[0]]);
      for (const bad of [0, -1, Number.NaN]) {
        try {
          await runPackTests(pack, ev, { liveCallBudgetMs: bad });
          expect.fail(`accepted ${bad}`);
        } catch (err) {
          expect(err).to.be.instanceOf(RangeError);
        }
      }
    });
  });

  describe('real evaluation', () => {
    let evaluator: Evaluator;
    before(async () => {
      // As an upload's tests run: a generous call budget, the live rule budget.
      evaluator = createEvaluator({ workers: 1, callBudgetMs: 10_000, ruleBudgetMs: 500 });
      await evaluator.ready();
    });
    after(async () => evaluator.close());

    it('refuses a pack whose rules each fit the rule budget but together overrun a live budget of 100 ms', async () => {
      // 8 rules of ~50 ms (idle machine) = ~400 ms, 4 times the budget; each far under 500 ms.
      const results = await runPackTests(compilePack(slowPack(8, 1)), evaluator, {
        liveCallBudgetMs: 100,
      });
      expect(results[0]!.passed, JSON.stringify(results[0]!.failures)).to.equal(false);
      expect(results[0]!.failures).to.have.length(1);
      expect(results[0]!.failures[0]).to.match(
        /^test 'case 1' takes \d+ ms to evaluate \(best of \d runs, compiling excluded\), over the live call budget of 100 ms: live calls would skip rules\. Slowest: slow-\d \(Slow check \d\) \d+ ms, slow-\d \(Slow check \d\) \d+ ms, slow-\d \(Slow check \d\) \d+ ms$/,
      );
      expect(results[0]!.evaluationMs).to.be.greaterThan(100);
      // Every rule completed: the refusal is the live budget's, not a timeout's.
      expect(
        results[0]!.trace.every((t) => t.status === 'fired' || t.status === 'not-fired'),
      ).to.equal(true);
    });

    it('validatePack refuses it the same way (pack validate), as a problem of that test', async () => {
      try {
        await validatePack(slowPack(8, 1), { evaluator, liveCallBudgetMs: 100 });
        expect.fail('accepted');
      } catch (err) {
        expect(err).to.be.instanceOf(PackValidationError);
        const problems = (err as PackValidationError).problems;
        expect(problems).to.have.length(1);
        expect(problems[0]!.path).to.equal('tests[0]');
        expect(problems[0]!.message).to.match(/over the live call budget of 100 ms/);
      }
    });

    it('accepts the same pack under a live budget of 10 s, without a warning', async () => {
      const results = await runPackTests(compilePack(slowPack(8, 2)), evaluator, {
        liveCallBudgetMs: 10_000,
      });
      expect(results.map((r) => r.passed)).to.deep.equal([true, true]);
      expect(results.flatMap((r) => r.warnings ?? [])).to.deep.equal([]);
    });

    it('accepts the shipped pack under the default live budget, without a warning', async () => {
      const compiled = await validatePack(shippedPackRaw(), { runTests: false });
      const results = await runPackTests(compiled, evaluator, {
        stopOnBudget: true,
        liveCallBudgetMs: 2000,
      });
      expect(results.filter((r) => !r.passed).map((r) => r.failures)).to.deep.equal([]);
      expect(results.flatMap((r) => r.warnings ?? [])).to.deep.equal([]);
      for (const r of results) {
        expect(r.evaluationMs).to.be.a('number').lessThan(1000);
      }
    });
  });
});

/**
 * Embedded pack tests under limits (an upload's tests must not hold the server for long) and
 * a test's `now` read the same on every host (review 5, findings 2 and 3).
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
  EvaluationInput,
  EvaluationResult,
  Evaluator,
  RulePack,
  TraceEntry,
} from '../../rules/index.ts';

function packWithTests(n: number): RulePack {
  return {
    id: 'limits',
    version: '1.0.0',
    title: 't',
    publisher: 'p',
    description: 'd',
    services: [{ id: 'svc', hook: 'patient-view', description: 'd' }],
    rules: [
      {
        id: 'today-is-march-1',
        service: 'svc',
        when: '%today = @2021-03-01',
        card: { summary: 'hi', indicator: 'info', source: { label: 'x' } },
      },
    ],
    tests: Array.from({ length: n }, (_, i) => ({
      name: `t${i}`,
      service: 'svc',
      now: '2021-03-01T12:00:00Z',
      request: { hook: 'patient-view', context: { patientId: 'p', userId: 'Practitioner/u' } },
      expect: { fire: ['today-is-march-1'] },
    })),
  };
}

/** An evaluator that answers from a script and advances a fake clock by `costMs` per call. */
function scriptedEvaluator(
  statuses: Array<TraceEntry['status']>,
  clock: { now: number },
  costMs: number,
): Evaluator & { calls: EvaluationInput[] } {
  const calls: EvaluationInput[] = [];
  return {
    calls,
    evaluate(pack, serviceId, input): Promise<EvaluationResult> {
      const status = statuses[calls.length] ?? 'fired';
      calls.push(input);
      clock.now += costMs;
      return Promise.resolve({
        pack: { id: pack.id, version: pack.version, hash: pack.hash },
        service: serviceId,
        cards: [],
        trace: [
          {
            ruleId: 'today-is-march-1',
            status,
            fired: status === 'fired',
            durationMs: costMs,
            ...(status === 'timeout' ? { error: 'exceeded the rule budget of 500 ms' } : {}),
            ...(status === 'skipped' ? { error: 'call budget exhausted' } : {}),
          },
        ],
        durationMs: costMs,
      });
    },
    ready: () => Promise.resolve(),
    warm: () => undefined,
    close: () => Promise.resolve(),
    stats: () => ({ workersStarted: 0, workersReplaced: 0, calls: calls.length }),
  };
}

describe('rules: embedded pack tests under limits', function () {
  this.timeout(60_000);

  describe('runPackTests with stopOnBudget', () => {
    for (const status of ['timeout', 'skipped'] as const) {
      it(`stops at the first test with a ${status} rule and reports the rest as not run`, async () => {
        const clock = { now: 0 };
        const ev = scriptedEvaluator(['fired', status, 'fired', 'fired'], clock, 10);
        const results = await runPackTests(compilePack(packWithTests(4)), ev, {
          stopOnBudget: true,
        });
        expect(ev.calls).to.have.length(2);
        expect(results.map((r) => r.passed)).to.deep.equal([true, false, false, false]);
        expect(results[1]!.failures.join('\n')).to.include(status);
        expect(results[1]!.notRun).to.not.equal(true);
        for (const r of results.slice(2)) {
          expect(r.notRun).to.equal(true);
          expect(r.failures).to.deep.equal(['not run: an earlier test ran out of its time budget']);
        }
      });
    }

    it('fails a test whose unexpected rule timed out (no expectation names it)', async () => {
      const pack = packWithTests(2);
      pack.tests![0]!.expect = {};
      const clock = { now: 0 };
      const ev = scriptedEvaluator(['timeout'], clock, 10);
      const results = await runPackTests(compilePack(pack), ev, { stopOnBudget: true });
      expect(results[0]!.passed).to.equal(false);
      expect(results[0]!.failures[0]).to.match(/^rule today-is-march-1: timeout/);
      expect(results[1]!.notRun).to.equal(true);
    });

    it('without limits keeps running every test (the local tools)', async () => {
      const clock = { now: 0 };
      const ev = scriptedEvaluator(['timeout', 'timeout', 'fired'], clock, 10);
      const results = await runPackTests(compilePack(packWithTests(3)), ev);
      expect(ev.calls).to.have.length(3);
      expect(results.map((r) => r.passed)).to.deep.equal([false, false, true]);
    });
  });

  describe('runPackTests with totalMs', () => {
    it('starts no test once the time for all tests is spent', async () => {
      const clock = { now: 1000 };
      const ev = scriptedEvaluator([], clock, 400);
      const results = await runPackTests(compilePack(packWithTests(5)), ev, {
        totalMs: 1000,
        clock: () => clock.now,
      });
      // 0 ms, 400 ms, 800 ms: started; 1200 ms: over.
      expect(ev.calls).to.have.length(3);
      expect(results.map((r) => r.passed)).to.deep.equal([true, true, true, false, false]);
      expect(results[3]!.notRun).to.equal(true);
      expect(results[3]!.failures).to.deep.equal([
        'not run: the tests of one pack may take at most 1 s in all',
      ]);
    });

    it('runs every test that fits', async () => {
      const clock = { now: 0 };
      const ev = scriptedEvaluator([], clock, 10);
      const results = await runPackTests(compilePack(packWithTests(5)), ev, {
        totalMs: 1000,
        clock: () => clock.now,
      });
      expect(results.every((r) => r.passed && r.notRun !== true)).to.equal(true);
    });
  });

  describe('the number of tests', () => {
    it('refuses a pack with more than 100 tests, naming the limit', async () => {
      try {
        await validatePack(packWithTests(101), { runTests: false });
        expect.fail('accepted');
      } catch (err) {
        expect(err).to.be.instanceOf(PackValidationError);
        expect((err as PackValidationError).problems).to.deep.include({
          path: 'tests',
          message: 'at most 100 tests per pack (split the pack, or keep the tests that matter)',
        });
      }
    });

    it('accepts 100', async () => {
      const compiled = await validatePack(packWithTests(100), { runTests: false });
      expect(compiled.pack.tests).to.have.length(100);
    });
  });

  describe("a test's now", () => {
    let evaluator: Evaluator;
    before(async () => {
      evaluator = createEvaluator({ workers: 1 });
      await evaluator.ready();
    });
    after(async () => {
      await evaluator.close();
    });

    const withNow = (now: string): RulePack => {
      const pack = packWithTests(1);
      pack.tests![0]!.now = now;
      return pack;
    };

    for (const now of ['2021-03-01T23:00', '2021-03-01T23:00:00', '2021-03-01T23:00:00.5']) {
      it(`refuses a time without an offset (${now}): it would be read in the host's zone`, async () => {
        try {
          await validatePack(withNow(now), { evaluator });
          expect.fail('accepted');
        } catch (err) {
          expect(err).to.be.instanceOf(PackValidationError);
          expect((err as PackValidationError).problems).to.deep.equal([
            {
              path: 'tests[0].now',
              message:
                'a time needs an offset (Z or +hh:mm), e.g. 2021-03-01T23:00:00Z; or give a date only',
            },
          ]);
        }
      });
    }

    for (const now of [
      '2021-03-01T23:00Z',
      '2021-03-01T18:00:00-05:00',
      '2021-03-02T00:30+01:00',
    ]) {
      it(`accepts a time with an offset (${now}) and pins it as that instant`, async () => {
        const compiled = await validatePack(withNow(now), { evaluator });
        expect(compiled.pack.tests![0]!.now).to.equal(now);
      });
    }

    it('reads a date-only now as that date (midnight UTC), on any host', async () => {
      await validatePack(withNow('2021-03-01'), { evaluator });
    });

    it('fails a test whose now has no offset even if the pack skipped validation', async () => {
      const [r] = await runPackTests(compilePack(withNow('2021-03-01T23:00')), evaluator);
      expect(r!.passed).to.equal(false);
      expect(r!.failures).to.deep.equal([
        'now: a time needs an offset (Z or +hh:mm), e.g. 2021-03-01T23:00:00Z; or give a date only',
      ]);
    });
  });
});

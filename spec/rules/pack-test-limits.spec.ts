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
import type { Evaluator, PackTest, RulePack } from '../../rules/index.ts';

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

/**
 * Backtracks catastrophically when the patient id is `a` (38 a's then `!` against
 * `^(a+)+$`: 28 a's already take seconds in fhirpath.js, each more doubles it), and fails at
 * once for any id not starting with `a`. It depends on the input, so nothing can compute it
 * ahead of the call; `tag` keeps the expressions of several such rules distinct.
 */
const slowWhenA = (tag = ''): string =>
  `(%context.patientId + '${'a'.repeat(37)}!${tag}').matches('^(a+)+$')`;

const card = { summary: 'hi', indicator: 'info', source: { label: 'x' } } as const;

/** A test per patient id: `a` overruns every slow rule, any other id is quick. */
function slowPack(
  patientIds: string[],
  opts: { slowRules?: number; expect?: PackTest['expect'] } = {},
): RulePack {
  const slow = Array.from({ length: opts.slowRules ?? 1 }, (_, k) => ({
    id: `slow-${k + 1}`,
    service: 'svc',
    when: slowWhenA(String(k + 1)),
    card,
  }));
  return {
    id: 'slow-limits',
    version: '1.0.0',
    title: 't',
    publisher: 'p',
    description: 'd',
    services: [{ id: 'svc', hook: 'patient-view', description: 'd' }],
    rules: [
      { id: 'today-is-march-1', service: 'svc', when: '%today = @2021-03-01', card },
      ...slow,
    ],
    tests: patientIds.map((patientId, i) => ({
      name: `t${i} (${patientId})`,
      service: 'svc',
      now: '2021-03-01T12:00:00Z',
      request: { hook: 'patient-view', context: { patientId, userId: 'Practitioner/u' } },
      expect: opts.expect ?? { fire: ['today-is-march-1'], notFire: slow.map((r) => r.id) },
    })),
  };
}

/** Calls the evaluator answered while `run` ran. */
async function counting<T>(ev: Evaluator, run: () => Promise<T>): Promise<[T, number]> {
  const before = ev.stats().calls;
  const out = await run();
  return [out, ev.stats().calls - before];
}

const RULE_BUDGET_MS = 200;

describe('rules: embedded pack tests under limits', function () {
  // Real workers on a possibly loaded machine: outcomes are asserted, not durations.
  this.timeout(60_000);

  /**
   * One slow rule per call: the rule budget trips (`timeout`). The call budget is generous so
   * that compiling in a replacement worker on a loaded machine never eats into it.
   */
  let ruleBound: Evaluator;
  /**
   * Six slow rules per call: each takes at least the rule budget, so the fifth could start no
   * earlier than 4 x 200 ms = the call budget; the rules left are `skipped`.
   */
  let callBound: Evaluator;
  before(async () => {
    ruleBound = createEvaluator({ workers: 1, ruleBudgetMs: RULE_BUDGET_MS, callBudgetMs: 3000 });
    callBound = createEvaluator({ workers: 1, ruleBudgetMs: RULE_BUDGET_MS, callBudgetMs: 800 });
    await Promise.all([ruleBound.ready(), callBound.ready()]);
  });
  // A timed-out worker is replaced; start each case with a full pool again.
  beforeEach(async () => {
    await Promise.all([ruleBound.ready(), callBound.ready()]);
  });
  after(async () => {
    await Promise.all([ruleBound.close(), callBound.close()]);
  });

  describe('runPackTests with stopOnBudget', () => {
    const cases = [
      { status: 'timeout', ev: () => ruleBound, slowRules: 1 },
      { status: 'skipped', ev: () => callBound, slowRules: 6 },
    ] as const;
    for (const { status, ev, slowRules } of cases) {
      it(`stops at the first test with a ${status} rule and reports the rest as not run`, async () => {
        const [results, calls] = await counting(ev(), () =>
          runPackTests(compilePack(slowPack(['p', 'a', 'p', 'p'], { slowRules })), ev(), {
            stopOnBudget: true,
          }),
        );
        expect(calls).to.equal(2);
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
      const pack = slowPack(['a', 'p'], { expect: { fire: ['today-is-march-1'] } });
      const results = await runPackTests(compilePack(pack), ruleBound, { stopOnBudget: true });
      expect(results[0]!.passed).to.equal(false);
      expect(results[0]!.failures).to.have.length(1);
      expect(results[0]!.failures[0]).to.match(/^rule slow-1: timeout/);
      expect(results[1]!.notRun).to.equal(true);
    });

    it('without limits keeps running every test (the local tools)', async () => {
      const [results, calls] = await counting(ruleBound, () =>
        runPackTests(compilePack(slowPack(['a', 'a', 'p'])), ruleBound),
      );
      expect(calls).to.equal(3);
      expect(results.map((r) => r.passed)).to.deep.equal([false, false, true]);
      expect(results.some((r) => r.notRun === true)).to.equal(false);
      for (const r of results.slice(0, 2)) {
        expect(r.failures).to.have.length(1);
        expect(r.failures[0]).to.match(/^expected rule slow-1 not to fire \(timeout: /);
      }
    });
  });

  describe('runPackTests with totalMs', () => {
    it('starts no test once the time for all tests is spent', async () => {
      // Each test overruns its rule, so it takes at least the rule budget (200 ms): the first
      // starts at once, the second maybe, the third at >= 400 ms, past the 350 ms allowed.
      const [results, calls] = await counting(ruleBound, () =>
        runPackTests(compilePack(slowPack(['a', 'a', 'a', 'a', 'a'])), ruleBound, {
          totalMs: 350,
        }),
      );
      expect(calls).to.be.within(1, 2);
      const ran = results.slice(0, calls);
      const left = results.slice(calls);
      expect(ran.every((r) => r.notRun !== true && r.failures.join().includes('timeout'))).to.equal(
        true,
      );
      expect(left).to.have.length.of.at.least(3);
      for (const r of left) {
        expect(r.passed).to.equal(false);
        expect(r.notRun).to.equal(true);
        expect(r.failures).to.deep.equal([
          'not run: the tests of one pack may take at most 0.35 s in all',
        ]);
      }
    });

    it('runs every test that fits', async () => {
      const [results, calls] = await counting(ruleBound, () =>
        runPackTests(compilePack(slowPack(['p', 'p', 'p', 'p', 'p'])), ruleBound, {
          totalMs: 30_000,
        }),
      );
      expect(calls).to.equal(5);
      expect(results.every((r) => r.passed && r.notRun !== true)).to.equal(true);
    });
  });

  describe('the number of tests', () => {
    it('refuses a pack with more than 200 tests, naming the limit', async () => {
      try {
        await validatePack(packWithTests(201), { runTests: false });
        expect.fail('accepted');
      } catch (err) {
        expect(err).to.be.instanceOf(PackValidationError);
        expect((err as PackValidationError).problems).to.deep.include({
          path: 'tests',
          message: 'at most 200 tests per pack (split the pack, or keep the tests that matter)',
        });
      }
    });

    it('accepts 200', async () => {
      const compiled = await validatePack(packWithTests(200), { runTests: false });
      expect(compiled.pack.tests).to.have.length(200);
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

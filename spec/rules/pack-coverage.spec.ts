/**
 * Test coverage of a pack (rules/pack-tests.ts `uncoveredRules`, `runPackTests` `onUncovered`,
 * `validatePack` `requireCoverage`): a rule counts as covered when it fired in one of the pack's
 * tests, named by an expectation or not. The server and the CLI turn it on
 * (spec/server/pack-test-coverage.spec.ts); the library leaves it to its caller.
 */
import { expect } from 'chai';
import {
  createEvaluator,
  PackValidationError,
  runPackTests,
  validatePack,
} from '../../rules/index.ts';
import type { Evaluator, PackProblem } from '../../rules/index.ts';
import { coveredTinyPack } from '../helpers/packs.ts';

interface PackTest {
  expect: { fire?: string[]; notFire?: string[] };
}

/** The firing test of warfarin-nsaid deleted. */
function withoutFiringTest(): Record<string, unknown> {
  const pack = coveredTinyPack('cov');
  return {
    ...pack,
    tests: (pack.tests as PackTest[]).filter(
      (t) => !(t.expect.fire ?? []).includes('warfarin-nsaid'),
    ),
  };
}

async function problemsOf(p: Promise<unknown>): Promise<PackProblem[]> {
  try {
    await p;
  } catch (err) {
    expect(err).to.be.instanceOf(PackValidationError);
    return (err as PackValidationError).problems;
  }
  throw new Error('expected a PackValidationError');
}

describe('rules/ pack test coverage', function () {
  this.timeout(60_000);
  let evaluator: Evaluator;
  before(async () => {
    evaluator = createEvaluator({ workers: 1, callBudgetMs: 10_000 });
    await evaluator.ready();
  });
  after(async () => {
    await evaluator.close();
  });

  it('validatePack with requireCoverage: a pack whose rules all fire in its tests is valid', async () => {
    const compiled = await validatePack(coveredTinyPack('cov'), {
      evaluator,
      requireCoverage: true,
    });
    expect(compiled.pack.rules).to.have.length(2);
  });

  it('validatePack with requireCoverage: names the rule no test fires, at rules[i]', async () => {
    const problems = await problemsOf(
      validatePack(withoutFiringTest(), { evaluator, requireCoverage: true }),
    );
    expect(problems).to.deep.equal([
      {
        path: 'rules[0]',
        message:
          "rule 'warfarin-nsaid' fires in none of the pack's tests: add a test where it fires",
      },
    ]);
  });

  it('validatePack with requireCoverage: tests: [] names every rule and says the pack has no tests', async () => {
    const problems = await problemsOf(
      validatePack({ ...coveredTinyPack('cov'), tests: [] }, { requireCoverage: true }),
    );
    expect(problems.map((p) => p.path)).to.deep.equal(['rules[0]', 'rules[1]', 'tests']);
  });

  it('is not checked without requireCoverage, nor with runTests: false', async () => {
    await validatePack(withoutFiringTest(), { evaluator });
    await validatePack(withoutFiringTest(), { runTests: false, requireCoverage: true });
  });

  it('runPackTests: onUncovered gets the uncovered rules once the tests have run', async () => {
    const compiled = await validatePack(withoutFiringTest(), { runTests: false });
    let uncovered: PackProblem[] | undefined;
    const results = await runPackTests(compiled, evaluator, {
      onUncovered: (u) => (uncovered = u),
    });
    expect(results.every((r) => r.passed)).to.equal(true);
    expect(uncovered?.map((p) => p.path)).to.deep.equal(['rules[0]']);
  });

  it('runPackTests: onUncovered is not called when a test was not run (time ran out)', async () => {
    const compiled = await validatePack(coveredTinyPack('cov'), { runTests: false });
    let called = false;
    const results = await runPackTests(compiled, evaluator, {
      totalMs: 0,
      onUncovered: () => (called = true),
    });
    expect(results.every((r) => r.notRun === true)).to.equal(true);
    expect(called).to.equal(false);
  });
});

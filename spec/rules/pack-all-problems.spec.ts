/**
 * A pack with a broken test file and other mistakes: every problem is reported in one run, so
 * the author does not fix the file, run again, and only then see the rest.
 */
import { expect } from 'chai';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createEvaluator, PackValidationError, validatePack } from '../../rules/index.ts';
import type { PackProblem } from '../../rules/index.ts';
import {
  BAD_FHIRPATH,
  brokenPack,
  MISSING_FILE,
  REQUEST,
  UNKNOWN_SERVICE,
} from '../helpers/broken-pack.ts';

async function problemsOf(
  raw: unknown,
  opts: Parameters<typeof validatePack>[1],
): Promise<PackProblem[]> {
  try {
    await validatePack(raw, opts);
  } catch (err) {
    expect(err).to.be.instanceOf(PackValidationError);
    return (err as PackValidationError).problems;
  }
  return expect.fail('expected a PackValidationError');
}

describe('rules: a pack with a broken test file and other problems', function () {
  this.timeout(60_000);
  let dir: string;
  before(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-all-problems-'));
  });
  after(() => {
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('reports the missing file, the bad FHIRPath and the unknown service in one run', async () => {
    const problems = await problemsOf(brokenPack(), { baseDir: dir });
    expect(problems).to.have.deep.members([MISSING_FILE(dir), BAD_FHIRPATH, UNKNOWN_SERVICE]);
    expect(problems).to.have.length(3);
  });

  it('leaves the unreadable test out of validation (reported once, by its file)', async () => {
    const pack = brokenPack();
    pack.rules = pack.rules.slice(0, 1);
    const problems = await problemsOf(pack, { baseDir: dir, runTests: true });
    // Not also "needs exactly one of ...", "resolve test files ..." or a failed run.
    expect(problems).to.deep.equal([MISSING_FILE(dir)]);
  });

  it('reports a file that is not JSON with the problems of other tests', async () => {
    fs.mkdirSync(path.join(dir, 'requests'), { recursive: true });
    fs.writeFileSync(path.join(dir, 'requests', 'broken.json'), '{ not json');
    const pack = brokenPack();
    pack.rules = pack.rules.slice(0, 1);
    pack.tests![0]!.requestFile = 'requests/broken.json';
    pack.tests![1]!.expect = { fire: ['no-such-rule'] };
    const problems = await problemsOf(pack, { baseDir: dir });
    expect(problems).to.have.deep.members([
      { path: 'tests[0].requestFile', message: 'cannot use requests/broken.json: not valid JSON' },
      { path: 'tests[1].expect.fire[0]', message: "unknown rule 'no-such-rule'" },
    ]);
    expect(problems).to.have.length(2);
  });

  it('names an unknown service of a patientBundle test once', async () => {
    const pack = brokenPack();
    pack.rules = pack.rules.slice(0, 1);
    const t = pack.tests![0]!;
    delete t.requestFile;
    t.patientBundle = 'bundles/missing.json';
    t.service = 'nosuch';
    t.expect = { notFire: ['always'] };
    const problems = await problemsOf(pack, { baseDir: dir });
    expect(problems.filter((p) => p.path === 'tests[0].service')).to.deep.equal([
      { path: 'tests[0].service', message: "unknown service 'nosuch'" },
    ]);
  });

  it('refuses a forbidden key in a test file, as one written in the pack', async () => {
    fs.mkdirSync(path.join(dir, 'requests'), { recursive: true });
    fs.writeFileSync(
      path.join(dir, 'requests', 'polluting.json'),
      '{"hook":"patient-view","context":{"__proto__":{"polluted":true},"patientId":"p"}}',
    );
    const pack = brokenPack();
    pack.tests![0]!.requestFile = 'requests/polluting.json';
    const problems = await problemsOf(pack, { baseDir: dir });
    expect(problems).to.deep.equal([
      { path: 'tests[0].request.context.__proto__', message: 'forbidden key' },
    ]);
    expect(({} as Record<string, unknown>).polluted).to.equal(undefined);
  });

  it('still validates and runs a pack whose files all resolve', async () => {
    fs.mkdirSync(path.join(dir, 'requests'), { recursive: true });
    fs.writeFileSync(path.join(dir, 'requests', 'ok.json'), JSON.stringify(REQUEST));
    const pack = brokenPack();
    pack.rules = pack.rules.slice(0, 1);
    pack.tests![0]!.requestFile = 'requests/ok.json';
    const evaluator = createEvaluator({ workers: 1 });
    try {
      // A worker starting on a loaded machine would otherwise eat the test's call budget.
      await evaluator.ready();
      const compiled = await validatePack(pack, { baseDir: dir, evaluator });
      expect(compiled.pack.tests![0]!.request).to.deep.equal(REQUEST);
      expect(compiled.pack.tests![0]!.requestFile).to.equal(undefined);
    } finally {
      await evaluator.close();
    }
  });
});

/**
 * Mistakes a pack author makes in an embedded test, refused with a message that says what to
 * do: an `expect` that names no rule (and so checks nothing), and a test file looked for in a
 * folder the author did not expect.
 */
import { expect } from 'chai';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { PackValidationError, resolvePackFiles, validatePack } from '../../rules/index.ts';
import type { PackProblem, PackTest, RulePack } from '../../rules/index.ts';

const NAMES_NO_RULE =
  'names no rule; list the rules that must fire under fire and those that must not under notFire (e.g. notFire: [my-rule])';

function packWithExpects(expects: Array<PackTest['expect']>): RulePack {
  return {
    id: 'authoring',
    version: '1.0.0',
    title: 't',
    publisher: 'p',
    description: 'd',
    services: [{ id: 'svc', hook: 'patient-view', description: 'd' }],
    rules: [
      {
        id: 'always',
        service: 'svc',
        when: 'true',
        card: { summary: 'hi', indicator: 'info', source: { label: 'x' } },
      },
    ],
    tests: expects.map((e, i) => ({
      name: `t${i}`,
      service: 'svc',
      now: '2021-03-01T12:00:00Z',
      request: { hook: 'patient-view', context: { patientId: 'p', userId: 'Practitioner/u' } },
      expect: e,
    })),
  };
}

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

describe('rules: pack test authoring mistakes', function () {
  this.timeout(60_000);

  describe('an expect that names no rule', () => {
    const empty: Array<[string, PackTest['expect']]> = [
      ['{}', {}],
      ['{ fire: [] } (meant as "no card")', { fire: [] }],
      ['{ notFire: [] }', { notFire: [] }],
      ['{ fire: [], notFire: [] }', { fire: [], notFire: [] }],
    ];
    for (const [label, e] of empty) {
      it(`refuses expect ${label}: it checks nothing`, async () => {
        // tests[2]: the path names the offending test, not the first one.
        const pack = packWithExpects([{ fire: ['always'] }, { fire: ['always'] }, e]);
        const problems = await problemsOf(pack, { runTests: false });
        expect(problems).to.deep.equal([{ path: 'tests[2].expect', message: NAMES_NO_RULE }]);
      });
    }

    it('refuses it even though the rule fires (the test would otherwise pass)', async () => {
      const problems = await problemsOf(packWithExpects([{ fire: [] }]), { runTests: true });
      expect(problems).to.deep.equal([{ path: 'tests[0].expect', message: NAMES_NO_RULE }]);
    });

    const named: Array<[string, PackTest['expect']]> = [
      ['fire only', { fire: ['always'] }],
      ['notFire only (a negative control)', { notFire: ['always'] }],
      ['fire with an empty notFire', { fire: ['always'], notFire: [] }],
    ];
    for (const [label, e] of named) {
      it(`accepts an expect naming a rule: ${label}`, async () => {
        const compiled = await validatePack(packWithExpects([e]), { runTests: false });
        expect(compiled.pack.tests![0]!.expect).to.deep.equal(e);
      });
    }
  });

  describe('a test file that is not found', () => {
    let dir: string;
    before(() => {
      dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-authoring-'));
    });
    after(() => {
      fs.rmSync(dir, { recursive: true, force: true });
    });

    const fileTest = (key: 'patientBundle' | 'requestFile', file: string): RulePack => {
      const pack = packWithExpects([{ fire: ['always'] }]);
      const t = pack.tests![0]!;
      delete t.request;
      t[key] = file;
      return pack;
    };

    for (const key of ['patientBundle', 'requestFile'] as const) {
      it(`names the path it looked for (${key}) and what it is relative to`, () => {
        const file = 'spec/fixtures/synthea-r4/nobody.json';
        const looked = path.resolve(dir, file);
        try {
          resolvePackFiles(fileTest(key, file), dir);
          expect.fail('accepted');
        } catch (err) {
          expect(err).to.be.instanceOf(PackValidationError);
          expect((err as PackValidationError).problems).to.deep.equal([
            {
              path: `tests[0].${key}`,
              message: `cannot use ${file}: file not found (looked for ${looked}; paths are relative to the pack file's folder)`,
            },
          ]);
        }
      });
    }

    it('says the same through validatePack with the pack file folder as baseDir', async () => {
      const problems = await problemsOf(fileTest('patientBundle', '../missing.json'), {
        baseDir: dir,
        runTests: false,
      });
      expect(problems).to.deep.equal([
        {
          path: 'tests[0].patientBundle',
          message: `cannot use ../missing.json: file not found (looked for ${path.resolve(dir, '../missing.json')}; paths are relative to the pack file's folder)`,
        },
      ]);
    });
  });
});

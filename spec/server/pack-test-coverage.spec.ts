/**
 * A pack version cannot switch a safety rule off unnoticed: every rule of a pack must fire in at
 * least one of the pack's own tests (CELLCDS_PACK_TEST_COVERAGE, default `required`). A patient
 * safety review made a medication-safety version whose warfarin+NSAID rule could never fire
 * (`when: "%context.patientId = 'nobody'"`) with `tests: []`, or with its tests edited to expect
 * no card: `pack validate` said ok and the upload was accepted. Now the upload (a rule author's
 * token, the real route) is refused with 422 naming each uncovered rule, and so are `pack test`
 * and `pack validate` (exit non-zero). Firing is what counts, not an `expect.fire` naming the
 * rule. A PlanDefinition carries no tests: refused while coverage is required.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import request from 'supertest';
import { loadConfig } from '../../server/config.ts';
import { coveredTinyPack } from '../helpers/packs.ts';
import { runCliAsync } from '../helpers/processes.ts';
import { buildTestApp, shippedPackRaw, type TestApp } from '../helpers/test-app.ts';

interface Problem {
  path: string;
  message: string;
}

type Pack = Record<string, unknown>;
interface PackTest {
  name: string;
  service: string;
  expect: { fire?: string[]; notFire?: string[] };
}

const UNCOVERED = (id: string) =>
  `rule '${id}' fires in none of the pack's tests: add a test where it fires`;

/** warfarin-nsaid switched off: a condition no patient meets. */
function switchedOff(pack: Pack): Pack {
  const rules = (pack.rules as Array<Record<string, unknown>>).map((r) =>
    r.id === 'warfarin-nsaid' ? { ...r, when: "%context.patientId = 'nobody'" } : r,
  );
  return { ...pack, rules };
}

/** The tests kept, those expecting warfarin-nsaid to fire edited to expect it not to. */
function testsEdited(pack: Pack): Pack {
  const tests = (pack.tests as PackTest[]).map((t) =>
    t.expect.fire?.includes('warfarin-nsaid')
      ? { ...t, expect: { notFire: ['warfarin-nsaid'] } }
      : t,
  );
  return { ...pack, tests };
}

/** The pack's firing test for warfarin-nsaid deleted (the negative control kept). */
function firingTestDeleted(pack: Pack): Pack {
  const tests = (pack.tests as PackTest[]).filter(
    (t) => !(t.expect.fire ?? []).includes('warfarin-nsaid'),
  );
  return { ...pack, tests };
}

const PLAN_DEFINITION = path.resolve(
  import.meta.dirname,
  '../../rules/packs/plandefinition-example/plandefinition.json',
);

describe('pack test coverage: every rule fires in one of the pack’s tests', function () {
  this.timeout(240_000);

  describe('upload (POST /admin/rule-packs, rule-author token), coverage required', () => {
    let t: TestApp;
    let author: string;
    const upload = (raw: unknown) =>
      request(t.app)
        .post('/admin/rule-packs')
        .set('authorization', `Bearer ${author}`)
        .send(raw as object);
    const refusedFor = async (raw: unknown): Promise<Problem[]> => {
      const res = await upload(raw);
      expect(res.status, JSON.stringify(res.body)).to.equal(422);
      expect(res.body.error).to.equal('unprocessable');
      return res.body.problems as Problem[];
    };
    const stored = async (id: string) =>
      (
        (await request(t.app).get('/admin/rule-packs').set('authorization', `Bearer ${author}`))
          .body as { packs: Array<{ id: string; version: string }> }
      ).packs.filter((p) => p.id === id);

    before(async () => {
      t = await buildTestApp({
        CELLCDS_SEED_DEMO: 'false',
        CELLCDS_PACK_TEST_COVERAGE: 'required',
      });
      const issued = await request(t.app)
        .post('/admin/tokens')
        .set('authorization', `Bearer ${t.adminToken}`)
        .send({ role: 'rule-author' });
      expect(issued.status).to.equal(201);
      author = (issued.body as { token: string }).token;
    });
    after(async () => {
      await t.close();
    });

    it('stores a pack each of whose rules fires in a test (201)', async () => {
      const res = await upload(coveredTinyPack('cov', '1.0.0'));
      expect(res.status, JSON.stringify(res.body)).to.equal(201);
    });

    it('refuses a version whose rule can never fire and that has no tests, naming every rule', async () => {
      const pack = { ...switchedOff(coveredTinyPack('cov', '1.1.0')), tests: [] };
      const problems = await refusedFor(pack);
      expect(problems).to.deep.include({ path: 'rules[0]', message: UNCOVERED('warfarin-nsaid') });
      expect(problems).to.deep.include({ path: 'rules[1]', message: UNCOVERED('hello') });
      expect(await stored('cov')).to.have.length(1);
    });

    it('refuses a version that switched a rule off and edited the tests expecting it', async () => {
      const problems = await refusedFor(testsEdited(switchedOff(coveredTinyPack('cov', '1.1.0'))));
      expect(problems).to.deep.equal([{ path: 'rules[0]', message: UNCOVERED('warfarin-nsaid') }]);
      expect(await stored('cov')).to.have.length(1);
    });

    it("refuses a version whose rule's only firing test was deleted (the rule unchanged)", async () => {
      const problems = await refusedFor(firingTestDeleted(coveredTinyPack('cov', '1.1.0')));
      expect(problems).to.deep.equal([{ path: 'rules[0]', message: UNCOVERED('warfarin-nsaid') }]);
    });

    it('stores the shipped medication-safety pack (each of its rules fires in a test)', async () => {
      const res = await upload(shippedPackRaw());
      expect(res.status, JSON.stringify(res.body)).to.equal(201);
    });

    it('counts a rule that fires in a test whose expect does not name it', async () => {
      const pack = coveredTinyPack('cov2', '1.0.0');
      const rules = pack.rules as Array<Record<string, unknown>>;
      // A second order-sign rule that fires on any draft: no test names it.
      rules.push({
        ...rules[0],
        id: 'any-draft',
        when: '%draftOrders.entry.exists()',
        card: { summary: 'A draft order', indicator: 'info', source: { label: 'specs' } },
      });
      const res = await upload(pack);
      expect(res.status, JSON.stringify(res.body)).to.equal(201);
    });

    it('refuses a PlanDefinition (it carries no tests), saying why', async () => {
      const raw = JSON.parse(fs.readFileSync(PLAN_DEFINITION, 'utf8')) as unknown;
      const problems = await refusedFor(raw);
      expect(problems.filter((p) => p.path.startsWith('rules['))).to.not.be.empty;
      expect(problems.every((p) => p.path === 'tests' || /fires in none/.test(p.message))).to.equal(
        true,
      );
      expect(problems.find((p) => p.path === 'tests')?.message).to.match(
        /no tests.*PlanDefinition carries none/,
      );
    });

    it('audits the refusal as a failed upload', async () => {
      const events = (
        await request(t.app)
          .get('/admin/audit?type=admin.pack.upload')
          .set('authorization', `Bearer ${t.adminToken}`)
      ).body.events as Array<{ outcome: string }>;
      expect(events.some((e) => e.outcome === 'failure')).to.equal(true);
    });
  });

  describe('the switch is the server’s, never the pack’s', () => {
    it('is required by default and only CELLCDS_PACK_TEST_COVERAGE=off turns it off', () => {
      const base = {
        CELLCDS_DATA_DIR: os.tmpdir(),
        CELLCDS_PUBLIC_URL: 'https://cds.test.example',
        CELLCDS_ADMIN_TOKEN: 'x'.repeat(40),
      };
      expect(loadConfig(base).packCheck.requireTestCoverage).to.equal(true);
      expect(
        loadConfig({ ...base, CELLCDS_PACK_TEST_COVERAGE: 'off' }).packCheck.requireTestCoverage,
      ).to.equal(false);
      expect(() => loadConfig({ ...base, CELLCDS_PACK_TEST_COVERAGE: 'false' })).to.throw(
        /CELLCDS_PACK_TEST_COVERAGE/,
      );
    });

    it('refuses a pack that tries to turn it off with a field of its own (unknown field)', async () => {
      const t = await buildTestApp({
        CELLCDS_SEED_DEMO: 'false',
        CELLCDS_PACK_TEST_COVERAGE: 'required',
      });
      try {
        const res = await t.uploadPack({
          ...coveredTinyPack('sneaky', '1.0.0'),
          testCoverage: 'off',
          tests: [],
        });
        expect(res.status).to.equal(422);
      } finally {
        await t.close();
      }
    });
  });

  describe('pack test / pack validate (CLI), coverage required', () => {
    let work: string;
    const cli = (args: string[]) =>
      runCliAsync(args, {
        ...process.env,
        CELLCDS_DATA_DIR: path.join(work, 'data'),
        CELLCDS_LOG_LEVEL: 'silent',
        CELLCDS_PACK_TEST_COVERAGE: 'required',
      });
    const write = (name: string, pack: unknown) => {
      const file = path.join(work, name);
      fs.writeFileSync(file, JSON.stringify(pack));
      return file;
    };

    before(() => {
      work = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-coverage-'));
    });
    after(() => {
      fs.rmSync(work, { recursive: true, force: true });
    });

    it('pack validate: ok for a covered pack, exit 1 naming the uncovered rule otherwise', async () => {
      const ok = await cli(['pack', 'validate', write('ok.json', coveredTinyPack('cov'))]);
      expect(ok.status, ok.stderr).to.equal(0);
      expect(ok.stdout).to.match(/^ok cov@1\.0\.0/);
      const file = write('off.json', testsEdited(switchedOff(coveredTinyPack('cov', '1.1.0'))));
      const off = await cli(['pack', 'validate', file]);
      expect(off.status).to.equal(1);
      expect(off.stderr).to.include(`rules[0]: ${UNCOVERED('warfarin-nsaid')}`);
      expect(off.stderr).to.not.include("rule 'hello'");
      expect(off.stdout).to.not.match(/^ok /);
    });

    it('pack validate: a pack with tests: [] names every rule', async () => {
      const file = write('none.json', { ...coveredTinyPack('cov', '1.1.0'), tests: [] });
      const r = await cli(['pack', 'validate', file]);
      expect(r.status).to.equal(1);
      expect(r.stderr).to.include(`rules[0]: ${UNCOVERED('warfarin-nsaid')}`);
      expect(r.stderr).to.include(`rules[1]: ${UNCOVERED('hello')}`);
    });

    it('pack test: every test passes, yet exit 1 naming the rule its tests never fire', async () => {
      const file = write('deleted.json', firingTestDeleted(coveredTinyPack('cov', '1.1.0')));
      const r = await cli(['pack', 'test', file]);
      expect(r.status, r.stderr).to.equal(1);
      expect(r.stdout).to.include('2 passed, 0 failed');
      expect(r.stdout).to.include(`rules[0]: ${UNCOVERED('warfarin-nsaid')}`);
      expect(r.stderr).to.include("1 rule(s) fire in none of the pack's tests");
      const ok = await cli(['pack', 'test', write('ok2.json', coveredTinyPack('cov'))]);
      expect(ok.status, ok.stdout + ok.stderr).to.equal(0);
    });

    it('pack validate: the shipped medication-safety pack passes (each rule fires in a test)', async () => {
      const r = await cli([
        'pack',
        'validate',
        path.resolve(import.meta.dirname, '../../rules/packs/medication-safety/pack.yaml'),
      ]);
      expect(r.status, r.stderr).to.equal(0);
    });
  });
});

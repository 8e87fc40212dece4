/**
 * A pack whose embedded tests pass at upload must not be too slow to answer live. The tests
 * get 10 s per call (their fresh worker compiles the pack inside the first), so an upload also
 * measures each test's evaluation with the pack compiled and refuses (422) a pack whose test
 * takes longer than the live call budget (CELLCDS_EVAL_BUDGET_MS): live, that pack would have
 * rules skipped on every call. The shipped pack and the demo seed still upload.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import { AdminService } from '../../server/admin-service.ts';
import { DEMO_TENANT, seedDemo } from '../../server/demo.ts';
import { slowPack } from '../helpers/slow-pack.ts';
import { buildTestApp, shippedPackRaw, type TestApp } from '../helpers/test-app.ts';

type Problem = { path: string; message: string };

/**
 * 8 rules of ~50 ms each on an idle machine (a few times that on a loaded one): ~400 ms in
 * all, 4 times this live budget, while each stays far under the 500 ms rule budget.
 */
const LIVE_BUDGET_MS = 100;

const REFUSAL =
  /^test 'case 1' takes (\d+) ms to evaluate \(best of \d runs, compiling excluded\), over the live call budget of 100 ms: live calls would skip rules\. Slowest: slow-\d \(Slow check \d\) \d+ ms, slow-\d \(Slow check \d\) \d+ ms, slow-\d \(Slow check \d\) \d+ ms$/;

describe('pack upload: tests measured against the live call budget', function () {
  this.timeout(180_000);

  describe(`with a live call budget of ${LIVE_BUDGET_MS} ms`, () => {
    let t: TestApp;
    before(async () => {
      t = await buildTestApp({ CELLCDS_EVAL_BUDGET_MS: String(LIVE_BUDGET_MS) });
    });
    after(async () => t.close());

    it('refuses (422) a pack whose passing test overruns the live budget, naming test, time, budget and slowest rules', async () => {
      const res = await t.uploadPack(slowPack(8, 2, 'too-slow'));
      expect(res.status, JSON.stringify(res.body)).to.equal(422);
      expect(res.body.error).to.equal('unprocessable');
      const problems = res.body.problems as Problem[];
      expect(problems).to.have.length(1);
      expect(problems[0]!.path).to.equal('tests[0]');
      const m = REFUSAL.exec(problems[0]!.message);
      expect(m, problems[0]!.message).to.not.equal(null);
      expect(Number(m![1])).to.be.greaterThan(LIVE_BUDGET_MS);
      expect((await t.deps.controlPlane.packs.versions('too-slow')).length).to.equal(0);
    });

    it('stores a pack whose tests fit the live budget', async () => {
      const res = await t.uploadPack(slowPack(0, 2, 'quick-enough'));
      expect(res.status, JSON.stringify(res.body)).to.equal(201);
      expect(res.body).to.not.have.property('warnings');
    });

    it('refuses it through the CLI too: pack test prints the refusal, exit 1', () => {
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-live-budget-'));
      try {
        const file = path.join(dir, 'pack.json');
        fs.writeFileSync(file, JSON.stringify(slowPack(8, 1, 'too-slow')));
        const r = spawnSync(
          process.execPath,
          ['--import', 'tsx', 'server/cli.ts', 'pack', 'test', file],
          {
            env: {
              ...process.env,
              CELLCDS_DATA_DIR: dir,
              CELLCDS_LOG_LEVEL: 'silent',
              CELLCDS_EVAL_BUDGET_MS: String(LIVE_BUDGET_MS),
            },
            encoding: 'utf8',
            timeout: 120_000,
          },
        );
        expect(r.status, r.stderr).to.equal(1);
        expect(r.stdout).to.match(/case 1\s+FAIL/);
        expect(r.stdout).to.match(
          /test 'case 1' takes \d+ ms to evaluate \(best of \d runs, compiling excluded\), over the live call budget of 100 ms/,
        );
        expect(r.stdout).to.include('0 passed, 1 failed');
      } finally {
        fs.rmSync(dir, { recursive: true, force: true });
      }
    });
  });

  describe('with the default live budget (2000 ms)', () => {
    let t: TestApp;
    before(async () => {
      t = await buildTestApp();
    });
    after(async () => t.close());

    it('stores the shipped pack, without a warning', async () => {
      const res = await t.uploadPack(shippedPackRaw());
      expect(res.status, JSON.stringify(res.body)).to.equal(201);
      expect(res.body).to.not.have.property('warnings');
    });

    it('seeds the demo (the shipped pack uploaded through the admin service)', async () => {
      const admin = new AdminService({
        controlPlane: t.deps.controlPlane,
        evaluator: t.deps.evaluator,
      });
      const seeded = await seedDemo({
        dataDir: t.dataDir,
        region: t.deps.config.region,
        controlPlane: t.deps.controlPlane,
        admin,
      });
      expect(seeded).to.equal(true);
      const tenants = await t.deps.controlPlane.tenants.list();
      expect(tenants.map((x) => x.id)).to.include(DEMO_TENANT);
    });
  });

  // 25 ms: the ~50 ms rule (only slower under load) is over it, and the trivial `quick` rule
  // keeps room for a GC pause (at 10 ms it too timed out in a loaded full run).
  describe('with a live rule budget of 25 ms', () => {
    let t: TestApp;
    before(async () => {
      t = await buildTestApp({ CELLCDS_RULE_BUDGET_MS: '25' });
    });
    after(async () => t.close());

    it("runs an upload's tests under the live rule budget (a ~50 ms rule times out: 422)", async () => {
      const res = await t.uploadPack(slowPack(1, 1, 'slow-rule'));
      expect(res.status, JSON.stringify(res.body)).to.equal(422);
      const problems = res.body.problems as Problem[];
      expect(problems[0]!.path).to.equal('tests[0]');
      expect(problems[0]!.message).to.match(/slow-1.*timeout/);
    });
  });
});

/**
 * A pack upload's embedded tests must not degrade live traffic (review 5, finding 2): they run
 * on an evaluator of their own (never the live pool's workers), stop at the first test that
 * runs out of its budget, are at most 100, and take a bounded time in all.
 */
import { expect } from 'chai';
import request from 'supertest';
import { AdminService } from '../../server/admin-service.ts';
import { buildTestApp, PUBLIC_URL, type TestApp } from '../helpers/test-app.ts';
import { patientViewRequest, tinyPack } from '../helpers/packs.ts';
import type { TestIssuer } from '../helpers/test-issuer.ts';

const NOOP_CARD = { summary: 's', indicator: 'info', source: { label: 'x' } };

/** A pack whose one rule overruns any budget (30^6 items), with `n` tests that run it. */
function hostilePack(id: string, n: number): Record<string, unknown> {
  const items = Array.from({ length: 30 }, (_, i) => `'v${i}'`).join(' | ');
  return {
    id,
    version: '1.0.0',
    title: 't',
    publisher: 'p',
    description: 'd',
    services: [{ id: `${id}-svc`, hook: 'patient-view', description: 'd' }],
    let: { x: items },
    rules: [
      {
        id: 'slow',
        service: `${id}-svc`,
        when: '%x.select(%x).select(%x).select(%x).select(%x).select(%x).count() > 0',
        card: NOOP_CARD,
      },
    ],
    tests: Array.from({ length: n }, (_, i) => ({
      name: `t${i}`,
      service: `${id}-svc`,
      now: '2021-03-01T12:00:00Z',
      request: { hook: 'patient-view', context: { patientId: 'p', userId: 'Practitioner/u' } },
      expect: { notFire: ['slow'] },
    })),
  };
}

/** A quick pack with `n` passing tests. */
function quickPack(id: string, n: number): Record<string, unknown> {
  return {
    id,
    version: '1.0.0',
    title: 't',
    publisher: 'p',
    description: 'd',
    services: [{ id: `${id}-svc`, hook: 'patient-view', description: 'd' }],
    rules: [
      { id: 'quick', service: `${id}-svc`, when: "%context.patientId = 'p'", card: NOOP_CARD },
    ],
    tests: Array.from({ length: n }, (_, i) => ({
      name: `t${i}`,
      service: `${id}-svc`,
      now: '2021-03-01T12:00:00Z',
      request: { hook: 'patient-view', context: { patientId: 'p', userId: 'Practitioner/u' } },
      expect: { fire: ['quick'] },
    })),
  };
}

describe('pack upload: embedded tests under limits', function () {
  this.timeout(120_000);
  let t: TestApp;
  let issuer: TestIssuer;

  before(async () => {
    t = await buildTestApp();
    expect((await t.uploadPack(tinyPack('live'))).status).to.equal(201);
    issuer = await t.addTenant('live-1', { subscriptions: [{ pack: 'live', version: '1.0.0' }] });
  });
  after(async () => t.close());

  const liveCall = async () => {
    const url = `${PUBLIC_URL}/cds-services/live-patient-view`;
    return request(t.app)
      .post('/cds-services/live-patient-view')
      .set('authorization', `Bearer ${await issuer.sign({ aud: url })}`)
      .send(patientViewRequest());
  };

  it('refuses a pack with more than 200 tests (422, before running any)', async () => {
    const before = t.deps.evaluator.stats().calls;
    const res = await t.uploadPack(quickPack('many-tests', 201));
    expect(res.status).to.equal(422);
    expect(res.body.error).to.equal('unprocessable');
    expect(res.body.problems).to.deep.include({
      path: 'tests',
      message: 'at most 200 tests per pack (split the pack, or keep the tests that matter)',
    });
    expect(t.deps.evaluator.stats().calls).to.equal(before);
  });

  it('runs the tests of a good pack and stores it', async () => {
    const res = await t.uploadPack(quickPack('quick-tests', 20));
    expect(res.status).to.equal(201);
  });

  it('stops at the first test over budget, never on the live workers, and live calls go on', async () => {
    const live = t.deps.evaluator.stats();
    const started = performance.now();
    const upload = t.uploadPack(hostilePack('hostile', 10)).then((r) => r);
    // A live call while the upload's tests run is answered normally.
    await new Promise((r) => setTimeout(r, 200));
    const call = await liveCall();
    const res = await upload;
    const took = performance.now() - started;

    expect(res.status).to.equal(422);
    const problems = res.body.problems as Array<{ path: string; message: string }>;
    expect(problems[0]!.path).to.equal('tests[0]');
    expect(problems[0]!.message).to.match(/timeout/);
    const notRun = problems.filter((p) => p.message.startsWith('not run:'));
    expect(notRun.map((p) => p.path)).to.deep.equal(
      Array.from({ length: 9 }, (_, i) => `tests[${i + 1}]`),
    );
    // One test over budget, not ten (the worker start under tsx is most of this).
    expect(took).to.be.lessThan(15_000);

    const after = t.deps.evaluator.stats();
    expect(after.workersReplaced, 'live workers replaced').to.equal(live.workersReplaced);
    expect(after.workersStarted, 'live workers started').to.equal(live.workersStarted);

    expect(call.status).to.equal(200);
    expect(call.body.cards.map((c: { summary: string }) => c.summary)).to.deep.equal([
      'Hello from the tiny pack',
    ]);
    const list = await request(t.app)
      .get('/admin/rule-packs')
      .set('authorization', `Bearer ${t.adminToken}`);
    expect(list.body.packs.map((p: { id: string }) => p.id)).to.not.include('hostile');
  });

  it('bounds the time of all the tests of an upload (tests left are not run; nothing stored)', async () => {
    const admin = new AdminService({
      controlPlane: t.deps.controlPlane,
      evaluator: t.deps.evaluator,
      uploadTests: { totalMs: 1 },
    });
    const operator = { tokenId: 'spec', role: 'platform-operator' as const };
    try {
      await admin.uploadPack(operator, quickPack('slow-suite', 5));
      expect.fail('accepted');
    } catch (err) {
      const problems = (err as { problems?: Array<{ path: string; message: string }> }).problems;
      expect(problems).to.be.an('array');
      expect(problems!.length).to.be.within(4, 5);
      for (const p of problems!) {
        expect(p.message).to.equal(
          'not run: the tests of one pack may take at most 0.001 s in all',
        );
      }
    }
    expect((await t.deps.controlPlane.packs.versions('slow-suite')).length).to.equal(0);
  });
});

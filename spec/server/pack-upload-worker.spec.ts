/**
 * A pack upload's validation and compilation run in a one-off worker thread under a time and a
 * heap limit, so that a huge or hostile pack never holds the event loop that serves every
 * tenant's hook calls (a 2,000-rule pack used to block it for 12.8 s). The upload body is
 * capped too (413).
 */
import { expect } from 'chai';
import request from 'supertest';
import YAML from 'yaml';
import type { PackCheckOptions } from '../../rules/index.ts';
import { AdminService } from '../../server/admin-service.ts';
import { ServiceError } from '../../server/errors.ts';
import { generatedPack } from '../helpers/generated-pack.ts';
import { buildTestApp, PUBLIC_URL, type TestApp } from '../helpers/test-app.ts';
import { patientViewRequest, tinyPack } from '../helpers/packs.ts';
import type { TestIssuer } from '../helpers/test-issuer.ts';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** The documented limit of a pack upload's body (docs/authoring-packs.md). */
const PACK_UPLOAD_LIMIT_BYTES = 4 * 1024 * 1024;

/** Rules of the generated pack: its validation takes seconds on the main thread. */
const RULES = 3000;

describe('pack upload: validation off the main thread', function () {
  this.timeout(180_000);

  describe('within the limits', () => {
    let t: TestApp;
    let issuer: TestIssuer;

    before(async () => {
      // Room for the 3,000-rule pack on a loaded machine (it takes 4-10 s here; default 20 s).
      t = await buildTestApp({ CELLCDS_PACK_CHECK_TIMEOUT_MS: '120000' });
      expect((await t.uploadPack(tinyPack('live'))).status).to.equal(201);
      issuer = await t.addTenant('live-1', {
        subscriptions: [{ pack: 'live', version: '1.0.0' }],
      });
    });
    after(async () => t.close());

    const liveCall = async () => {
      const url = `${PUBLIC_URL}/cds-services/live-patient-view`;
      return request(t.app)
        .post('/cds-services/live-patient-view')
        .set('authorization', `Bearer ${await issuer.sign({ aud: url })}`)
        .send(patientViewRequest());
    };

    it(`stores a ${RULES}-rule pack while /healthz and hook calls keep answering`, async () => {
      const big = generatedPack('big', RULES);
      const state = { uploadDone: false };
      const uploading = () => !state.uploadDone;
      const started = performance.now();
      const upload = t.uploadPack(big).then((res) => {
        state.uploadDone = true;
        return { res, at: performance.now() };
      });
      // Let the upload's request reach the server, then probe while it is in flight: each
      // /healthz answer is a moment the event loop was free. Validation on the main thread
      // would leave one gap as long as (most of) the upload.
      // (The probes start 300 ms in, as scheduled: a blocked event loop delays that too.)
      const probeStart = started + 300;
      await sleep(300);
      let callBeforeUpload: boolean | undefined;
      const call = liveCall().then((res) => {
        callBeforeUpload = uploading();
        return res;
      });
      const answered: number[] = [];
      while (uploading()) {
        const health = await request(t.app).get('/healthz');
        expect(health.status).to.equal(200);
        if (uploading()) {
          answered.push(performance.now());
        }
        await sleep(25);
      }
      const { res, at: uploadEnd } = await upload;
      const callRes = await call;

      expect(res.status, JSON.stringify(res.body).slice(0, 500)).to.equal(201);
      expect(res.body.id).to.equal('big');
      expect(callRes.status).to.equal(200);
      expect(callRes.body.cards.map((c: { summary: string }) => c.summary)).to.deep.equal([
        'Hello from the tiny pack',
      ]);
      // Ordering, not milliseconds: the hook call and several health checks were answered
      // before the upload was, and no stretch without an answer lasted a third of the upload
      // (validating on the main thread, one stretch lasted most of it).
      expect(callBeforeUpload, 'hook call answered before the upload').to.equal(true);
      expect(answered.length, 'health checks answered during the upload').to.be.at.least(5);
      const marks = [probeStart, ...answered, uploadEnd];
      const longestGap = Math.max(...marks.slice(1).map((m, i) => m - marks[i]!));
      const uploadMs = uploadEnd - started;
      expect(longestGap, `longest gap ${longestGap} ms of a ${uploadMs} ms upload`).to.be.lessThan(
        uploadMs / 3,
      );

      const stored = await request(t.app)
        .get('/admin/rule-packs/big/versions/1.0.0')
        .set('authorization', `Bearer ${t.adminToken}`);
      expect(stored.status).to.equal(200);
      expect(stored.body.hash).to.equal(res.body.hash);
    });

    it('refuses an upload body over the pack limit with 413 naming the limit', async () => {
      const res = await request(t.app)
        .post('/admin/rule-packs')
        .set('authorization', `Bearer ${t.adminToken}`)
        .set('content-type', 'application/json')
        .send(JSON.stringify({ ...tinyPack('too-big'), pad: 'x'.repeat(PACK_UPLOAD_LIMIT_BYTES) }));
      expect(res.status).to.equal(413);
      expect(res.body.error).to.equal('payload_too_large');
      expect(res.body.message).to.equal(
        `a rule pack upload may be at most ${PACK_UPLOAD_LIMIT_BYTES / (1024 * 1024)} MB; split the pack`,
      );
      expect(res.body.limitBytes).to.equal(PACK_UPLOAD_LIMIT_BYTES);
      const health = await request(t.app).get('/healthz');
      expect(health.status).to.equal(200);
    });

    it('accepts a pack just under the body limit as far as the body goes (then validates it)', async () => {
      const body = JSON.stringify({ ...tinyPack('just-under'), pad: '' });
      const pad = 'x'.repeat(PACK_UPLOAD_LIMIT_BYTES - Buffer.byteLength(body) - 1);
      const res = await request(t.app)
        .post('/admin/rule-packs')
        .set('authorization', `Bearer ${t.adminToken}`)
        .set('content-type', 'application/json')
        .send(JSON.stringify({ ...tinyPack('just-under'), pad }));
      // Read and validated: the unknown field is the problem, not the size.
      expect(res.status).to.equal(422);
      expect(res.body.problems).to.deep.include({ path: 'pad', message: 'unknown field' });
    });
  });

  // Time: the 3,000-rule pack takes seconds. Memory: its YAML (1.6 MB) takes over 96 MB to
  // parse and validate; a worker starts in about 24 MB.
  const overruns: Array<
    [string, Record<string, string>, (t: TestApp) => Promise<request.Response>, RegExp]
  > = [
    [
      'time',
      { CELLCDS_PACK_CHECK_TIMEOUT_MS: '100' },
      (t) => t.uploadPack(generatedPack('too-costly', RULES)),
      /^validating the pack took more than 0\.1 s, the server's limit for one pack; split the pack/,
    ],
    [
      'memory',
      { CELLCDS_PACK_CHECK_MEMORY_MB: '40' },
      (t) =>
        request(t.app)
          .post('/admin/rule-packs')
          .set('authorization', `Bearer ${t.adminToken}`)
          .set('content-type', 'application/yaml')
          .send(YAML.stringify(generatedPack('too-costly', RULES))),
      /^validating the pack needed more than 40 MB of memory, the server's limit for one pack; split the pack/,
    ],
  ];
  for (const [limit, env, upload, message] of overruns) {
    describe(`over the ${limit} limit`, () => {
      let t: TestApp;
      before(async () => {
        t = await buildTestApp(env);
      });
      after(async () => t.close());

      it(`refuses the pack with 422 naming the ${limit} limit, stores nothing, and keeps serving`, async () => {
        const res = await upload(t);
        expect(res.status, JSON.stringify(res.body).slice(0, 500)).to.equal(422);
        expect(res.body.error).to.equal('unprocessable');
        expect(res.body.message).to.equal(
          `rule pack refused: its validation exceeded the ${limit} limit`,
        );
        expect(res.body.problems).to.have.length(1);
        expect(res.body.problems[0].path).to.equal('(pack)');
        expect(res.body.problems[0].message).to.match(message);
        const list = await request(t.app)
          .get('/admin/rule-packs')
          .set('authorization', `Bearer ${t.adminToken}`);
        expect(list.body.packs.map((p: { id: string }) => p.id)).to.not.include('too-costly');
        const audit = await request(t.app)
          .get('/admin/audit?type=admin.pack.upload')
          .set('authorization', `Bearer ${t.adminToken}`);
        const events = audit.body.events as Array<{ outcome: string }>;
        expect(events.at(-1)?.outcome).to.equal('failure');

        // The server goes on: health, and the next (small) upload is checked and stored.
        expect((await request(t.app).get('/healthz')).status).to.equal(200);
        expect((await t.uploadPack(tinyPack('after-overrun'))).status).to.equal(201);
      });
    });
  }

  describe('when the validation worker cannot run', () => {
    let t: TestApp;
    before(async () => {
      t = await buildTestApp();
    });
    after(async () => t.close());

    const operator = { tokenId: 'spec', role: 'platform-operator' as const };
    const cannotRun: Array<[string, PackCheckOptions]> = [
      ['it does not start in time', { startTimeoutMs: 1 }],
      ['its heap cannot even hold the validator', { memoryMb: 8 }],
    ];
    for (const [name, packCheck] of cannotRun) {
      it(`answers 503 unavailable (not 422, not 500) when ${name}`, async () => {
        const admin = new AdminService({
          controlPlane: t.deps.controlPlane,
          evaluator: t.deps.evaluator,
          packCheck,
        });
        try {
          await admin.uploadPack(operator, tinyPack('not-checked'));
          expect.fail('accepted');
        } catch (err) {
          expect(err).to.be.instanceOf(ServiceError);
          expect((err as ServiceError).status).to.equal(503);
          expect((err as ServiceError).code).to.equal('unavailable');
          expect((err as ServiceError).message).to.equal(
            'the pack cannot be validated now; try again',
          );
        }
        expect((await t.deps.controlPlane.packs.versions('not-checked')).length).to.equal(0);
      });
    }
  });
});

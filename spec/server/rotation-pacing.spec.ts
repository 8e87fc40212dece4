import { expect } from 'chai';
import request from 'supertest';
import { buildTestApp, PUBLIC_URL, type TestApp } from '../helpers/test-app.ts';
import { tinyPack, warfarinNsaidRequest } from '../helpers/packs.ts';

describe('DEK rotation pacing from the configuration (CELLCDS_REWRAP_*)', function () {
  this.timeout(60_000);
  let t: TestApp;
  after(async () => t.close());

  it('runs scheduled batches of the configured budget (a head a quarter), paused as configured', async () => {
    t = await buildTestApp({
      CELLCDS_REWRAP_SCHEDULED_BATCH: '2',
      CELLCDS_REWRAP_THROTTLE_MS: '60000',
    });
    expect((await t.uploadPack(tinyPack('tiny'))).status).to.equal(201);
    const issuer = await t.addTenant('tenant-a', {
      subscriptions: [{ pack: 'tiny', version: '1.0.0' }],
    });
    const aud = `${PUBLIC_URL}/cds-services/tiny-order-sign`;
    for (let i = 0; i < 12; i++) {
      const res = await request(t.app)
        .post('/cds-services/tiny-order-sign')
        .set('authorization', `Bearer ${await issuer.sign({ aud })}`)
        .send(warfarinNsaidRequest());
      expect(res.status).to.equal(200);
    }
    const op = (r: request.Test) => r.set('authorization', `Bearer ${t.adminToken}`);
    const rot = await op(request(t.app).post('/admin/tenants/tenant-a/keys/rotate')).send({});
    expect(rot.status).to.equal(202);
    let job = rot.body as { id: string; status: string; done: number; total: number };
    for (let i = 0; i < 200 && job.done === 0; i++) {
      await new Promise((r) => setTimeout(r, 20));
      job = (await op(request(t.app).get(`/admin/jobs/${job.id}`))).body;
    }
    // A budget of 2 re-seals = 8 heads, then a 60 s pause: the job stays there.
    expect(job).to.include({ status: 'running', done: 8, total: 12 });
    await new Promise((r) => setTimeout(r, 300));
    expect((await op(request(t.app).get(`/admin/jobs/${job.id}`))).body).to.include({
      status: 'running',
      done: 8,
    });
  });
});

import { expect } from 'chai';
import request from 'supertest';
import { buildTestApp, type TestApp } from '../helpers/test-app.ts';

/**
 * `GET /admin/jobs/{id}` (`cellcds keys job`) for a KEK rewrap job after a newer rotation: an
 * on-call engineer checking yesterday's rotation gets the job, not 404.
 */
describe('admin API: an older KEK rewrap job', function () {
  this.timeout(60_000);
  let t: TestApp;
  const op = (r: request.Test) => r.set('authorization', `Bearer ${t.adminToken}`);

  beforeEach(async () => {
    t = await buildTestApp();
  });
  afterEach(async () => {
    await t.close();
  });

  async function rotateAndWait(region: string): Promise<Record<string, unknown>> {
    const rot = await op(request(t.app).post(`/admin/regions/${region}/kek/rotate`)).send({});
    expect(rot.status, JSON.stringify(rot.body)).to.equal(202);
    const id = rot.body.id as string;
    for (;;) {
      const got = await op(request(t.app).get(`/admin/jobs/${id}`));
      expect(got.status).to.equal(200);
      if (got.body.status !== 'running') {
        return got.body as Record<string, unknown>;
      }
      await new Promise((r) => setTimeout(r, 10));
    }
  }

  it('answers the job with supersededBy after a newer rotation; a version never held is 404', async () => {
    const region = t.deps.stores.region;
    const first = await rotateAndWait(region);
    const second = await rotateAndWait(region);
    expect(first).to.include({ status: 'done' });
    const got = await op(request(t.app).get(`/admin/jobs/${String(first.id)}`));
    expect(got.status).to.equal(200);
    expect(got.body).to.deep.equal({ ...first, supersededBy: second.id });
    const never = await op(request(t.app).get(`/admin/jobs/kek.${region}.99`));
    expect(never.status).to.equal(404);
  });
});

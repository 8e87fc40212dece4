import path from 'node:path';
import { expect } from 'chai';
import { QueryTypes, Sequelize } from 'sequelize';
import request from 'supertest';
import { buildTestApp, PUBLIC_URL, type TestApp } from '../helpers/test-app.ts';
import { tinyPack, warfarinNsaidRequest } from '../helpers/packs.ts';
import { createLocalKeyProvider, openRegionStores } from '../../tenants/index.ts';

/**
 * A DEK rewrap job's owner and lease through the admin API: a running job shows the replica
 * that holds it, and a job left by a replica that is gone runs on the replica that reads it or
 * that refuses a rotation because of it.
 */
describe('admin API: the owner and lease of a rewrap job', function () {
  this.timeout(60_000);
  let t: TestApp;
  const op = (r: request.Test) => r.set('authorization', `Bearer ${t.adminToken}`);

  async function appWithRecords(env: Record<string, string> = {}): Promise<void> {
    t = await buildTestApp(env);
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
  }

  afterEach(async () => {
    await t.close();
  });

  it('GET /admin/jobs/{id} shows the replica holding a running job and its lease; an ended job has none', async () => {
    await appWithRecords({
      CELLCDS_REWRAP_SCHEDULED_BATCH: '2',
      CELLCDS_REWRAP_THROTTLE_MS: '60000',
    });
    const rot = await op(request(t.app).post('/admin/tenants/tenant-a/keys/rotate')).send({});
    expect(rot.status).to.equal(202);
    const id = rot.body.id as string;
    const got = await op(request(t.app).get(`/admin/jobs/${id}`));
    for (const body of [rot.body, got.body]) {
      expect(body).to.include({ id, status: 'running', leaseOwner: t.deps.stores.jobOwner });
      expect(Date.parse(body.leaseExpiresAt as string)).to.be.above(Date.now());
    }
    const emergency = await op(request(t.app).post('/admin/tenants/tenant-a/keys/rotate')).send({
      emergency: true,
    });
    expect(emergency.status).to.equal(202);
    let job = emergency.body as Record<string, unknown>;
    for (let i = 0; i < 200 && job.status === 'running'; i++) {
      await new Promise((r) => setTimeout(r, 25));
      job = (await op(request(t.app).get(`/admin/jobs/${String(job.id)}`))).body;
    }
    const superseded = (await op(request(t.app).get(`/admin/jobs/${id}`))).body;
    expect(superseded.status).to.equal('superseded');
    expect(job.status).to.equal('done');
    for (const body of [superseded, job]) {
      expect(body).to.not.have.any.keys('leaseOwner', 'leaseExpiresAt');
    }
  });

  it('CELLCDS_JOB_LEASE_MS is the lease this plane holds on the jobs it runs', async () => {
    await appWithRecords({
      CELLCDS_JOB_LEASE_MS: '3600000',
      CELLCDS_REWRAP_SCHEDULED_BATCH: '2',
      CELLCDS_REWRAP_THROTTLE_MS: '60000',
    });
    const before = Date.now();
    const rot = await op(request(t.app).post('/admin/tenants/tenant-a/keys/rotate')).send({});
    expect(rot.status).to.equal(202);
    const got = await op(request(t.app).get(`/admin/jobs/${rot.body.id as string}`));
    expect(got.body).to.include({ status: 'running', leaseOwner: t.deps.stores.jobOwner });
    // An hour from the rotation, not the default minute.
    expect(Date.parse(got.body.leaseExpiresAt as string) - before).to.be.within(
      3_600_000 - 5_000,
      3_600_000 + 60_000,
    );
  });

  it('a job left by a replica that is gone runs here after a refused rotation (409) or a job read', async () => {
    await appWithRecords();
    const region = t.deps.stores.region;
    const file = path.join(t.dataDir, region, 'tenant-a.sqlite');
    const db = new Sequelize({ dialect: 'sqlite', storage: file, logging: false });
    const status = async (id: string) =>
      (
        await db.query<{ status: string }>('SELECT status FROM jobs WHERE id = :id', {
          type: QueryTypes.SELECT,
          replacements: { id },
        })
      )[0]?.status;
    const untilDone = async (id: string) => {
      for (let i = 0; i < 400 && (await status(id)) === 'running'; i++) {
        await new Promise((r) => setTimeout(r, 25));
      }
      return status(id);
    };
    /** Another replica rotates and stops; then its lease is one of a replica long gone. */
    const orphaned = async (): Promise<string> => {
      const other = await openRegionStores({
        region,
        dataDir: t.dataDir,
        keyProvider: await createLocalKeyProvider({ keyDir: path.join(t.dataDir, 'keys'), region }),
        rewrap: { scheduledBatchSize: 1, throttleMs: 600_000 },
      });
      const job = await other.store('tenant-a').keys.rotate();
      await other.close();
      await db.query(
        `UPDATE jobs SET lease_owner = 'gone-host:1:dead', lease_until = '2000-01-01T00:00:00.000Z'
         WHERE id = :id`,
        { replacements: { id: job.id } },
      );
      return job.id;
    };
    try {
      const first = await orphaned();
      const refused = await op(request(t.app).post('/admin/tenants/tenant-a/keys/rotate')).send({});
      expect(refused.status).to.equal(409);
      expect(await untilDone(first)).to.equal('done'); // no job read in between

      const second = await orphaned();
      const read = await op(request(t.app).get(`/admin/jobs/${second}`));
      expect(read.status).to.equal(200);
      expect(read.body).to.include({ status: 'running', leaseOwner: 'gone-host:1:dead' });
      expect(await untilDone(second)).to.equal('done');
      const after = await op(request(t.app).get(`/admin/jobs/${second}`));
      expect(after.body).to.include({ status: 'done', done: 12, total: 12 });
      expect(after.body).to.not.have.any.keys('leaseOwner', 'leaseExpiresAt');

      const events = await t.deps.stores.store('tenant-a').audit.list({ limit: 10_000 });
      expect(
        events.filter((e) => e.type === 'key.rewrap.takeover').map((e) => e.detail),
      ).to.deep.equal(
        [first, second].map((job) => ({
          job,
          from: 'gone-host:1:dead',
          to: t.deps.stores.jobOwner,
          leaseExpiredAt: '2000-01-01T00:00:00.000Z',
          done: 4,
          total: 12,
        })),
      );
    } finally {
      await db.close();
    }
  });
});

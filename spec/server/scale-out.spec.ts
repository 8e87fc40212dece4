import { expect } from 'chai';
import { Redis } from 'ioredis';
import request from 'supertest';
import { ConfigError } from '../../server/config.ts';
import { buildTestApp, PUBLIC_URL, type TestApp } from '../helpers/test-app.ts';
import { tinyPack, warfarinNsaidRequest } from '../helpers/packs.ts';
import { TestIssuer } from '../helpers/test-issuer.ts';

const redisUrl = process.env.CELLCDS_TEST_REDIS_URL;

/** Two replicas behind a load balancer share the replay cache in the real Redis. */
describe('scale-out: replicas share the jti replay cache (Redis)', function () {
  if (!redisUrl) {
    it('needs CELLCDS_TEST_REDIS_URL (e.g. redis://127.0.0.1:6379)');
    return;
  }
  let one: TestApp;
  let two: TestApp;
  let issuer: TestIssuer;
  const url = `${PUBLIC_URL}/cds-services/tiny-order-sign`;

  before(async () => {
    issuer = await TestIssuer.create({
      iss: `https://ehr-scale-${process.pid}-${Date.now()}.example`,
    });
    one = await buildTestApp({ CELLCDS_REDIS_URL: redisUrl });
    two = await buildTestApp({ CELLCDS_REDIS_URL: redisUrl });
    for (const t of [one, two]) {
      expect((await t.uploadPack(tinyPack('tiny'))).status).to.equal(201);
      await t.addTenant('hosp', { subscriptions: [{ pack: 'tiny', version: '1.0.0' }], issuer });
    }
  });
  after(async () => {
    await one.close();
    await two.close();
  });

  it('refuses on replica two a token already used on replica one', async () => {
    const token = await issuer.sign({ aud: url });
    const first = await request(one.app)
      .post('/cds-services/tiny-order-sign')
      .set('authorization', `Bearer ${token}`)
      .send(warfarinNsaidRequest());
    expect(first.status).to.equal(200);
    const replay = await request(two.app)
      .post('/cds-services/tiny-order-sign')
      .set('authorization', `Bearer ${token}`)
      .send(warfarinNsaidRequest());
    expect(replay.status).to.equal(401);
    const fresh = await request(two.app)
      .post('/cds-services/tiny-order-sign')
      .set('authorization', `Bearer ${await issuer.sign({ aud: url })}`)
      .send(warfarinNsaidRequest());
    expect(fresh.status).to.equal(200);
  });

  it('warns at boot when Redis would forget jtis on a restart (no AOF), and only then', async () => {
    const admin = new Redis(redisUrl);
    try {
      const aof = (await admin.config('GET', 'appendonly'))[1] === 'yes';
      const warned = one.logLines.some((line) => {
        const entry = JSON.parse(line) as { level?: string; msg?: string };
        return entry.level === 'warn' && /without AOF/.test(entry.msg ?? '');
      });
      expect(warned).to.equal(!aof);
    } finally {
      await admin.quit();
    }
  });

  it('will not start on a Redis that may evict keys, naming the setting and the fix', async () => {
    const admin = new Redis(redisUrl);
    const reply = await admin.config('GET', 'maxmemory-policy');
    try {
      await admin.config('SET', 'maxmemory-policy', 'allkeys-lru');
      const err = await buildTestApp({ CELLCDS_REDIS_URL: redisUrl }).then(
        async (t) => {
          await t.close();
          return undefined;
        },
        (e: unknown) => e,
      );
      expect(err).to.be.instanceOf(ConfigError);
      expect(String(err)).to.include('CELLCDS_REDIS_URL').and.to.include('noeviction');
    } finally {
      await admin.config('SET', 'maxmemory-policy', reply[1] ?? 'noeviction');
      await admin.quit();
    }
  });
});

/**
 * Two replicas of one region share its data plane but were started with different keyring
 * folders (`keyProvider.dir`): the second holds no key for a tenant the first provisioned. Its
 * calls used to answer 409 "the tenant's key was destroyed in this region (its data here was
 * crypto-shredded)", counted as a client error and logged at info: on-call was told data was
 * shredded when it was not. A key absent without a tombstone is a server-side fault: 503, an
 * error log naming the likely cause, an `error` outcome. A destroyed key stays 409, and a
 * tenant new to the region still gets its key on its first write.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import request from 'supertest';
import { buildTestApp, PUBLIC_URL, type TestApp } from '../helpers/test-app.ts';
import { tinyPack, warfarinNsaidRequest } from '../helpers/packs.ts';
import { TestIssuer } from '../helpers/test-issuer.ts';

interface LogLine {
  level: number | string;
  msg?: string;
  reason?: string;
  status?: number;
  err?: { message?: string };
}

const SERVICE = `${PUBLIC_URL}/cds-services/tiny-order-sign`;

describe('a replica whose keyring does not hold a tenant key (replicas not sharing keyProvider.dir)', function () {
  this.timeout(60_000);
  let dir: string;
  let one: TestApp;
  let two: TestApp;
  let issuer: TestIssuer;
  let fresh: TestIssuer;

  function regionsFile(name: string, keyDir: string): string {
    const file = path.join(dir, `${name}.regions.json`);
    fs.writeFileSync(
      file,
      JSON.stringify({
        regions: [
          {
            id: 'r1',
            jurisdiction: 'US',
            publicUrl: PUBLIC_URL,
            storage: { dataDir: path.join(dir, 'data') },
            backupDir: path.join(dir, 'backups'),
            keyProvider: { kind: 'local-keyring', dir: keyDir },
          },
        ],
      }),
    );
    return file;
  }
  const call = async (t: TestApp, who: TestIssuer) =>
    request(t.app)
      .post('/cds-services/tiny-order-sign')
      .set('authorization', `Bearer ${await who.sign({ aud: SERVICE })}`)
      .send(warfarinNsaidRequest());
  const hookCount = async (t: TestApp, outcome: string): Promise<number> =>
    (await request(t.app).get('/metrics')).text
      .split('\n')
      .filter(
        (l) =>
          l.startsWith('cellcds_hook_duration_seconds_count{') &&
          l.includes('endpoint="call"') &&
          l.includes(`outcome="${outcome}"`),
      )
      .reduce((sum, l) => sum + Number(l.split(' ').at(-1)), 0);

  before(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-keyring-mismatch-'));
    issuer = await TestIssuer.create({ iss: `https://ehr-km-${process.pid}.example` });
    fresh = await TestIssuer.create({ iss: `https://ehr-km-fresh-${process.pid}.example` });
    const common = { CELLCDS_REGION: 'r1', CELLCDS_SEED_DEMO: 'false' };
    one = await buildTestApp({
      ...common,
      CELLCDS_REGIONS_FILE: regionsFile('one', path.join(dir, 'keys-shared')),
    });
    // The misconfigured replica: same data plane, an empty keyring folder of its own.
    two = await buildTestApp({
      ...common,
      CELLCDS_REGIONS_FILE: regionsFile('two', path.join(dir, 'keys-wrong')),
    });
    for (const t of [one, two]) {
      expect((await t.uploadPack(tinyPack('tiny'))).status).to.equal(201);
      await t.addTenant('hosp', { subscriptions: [{ pack: 'tiny', version: '1.0.0' }], issuer });
    }
    await two.addTenant('newhosp', {
      subscriptions: [{ pack: 'tiny', version: '1.0.0' }],
      issuer: fresh,
    });
  });
  after(async () => {
    await one.close();
    await two.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('answers 503 naming the keyring, logs an error, counts an error outcome: never "destroyed"', async () => {
    expect((await call(one, issuer)).status).to.equal(200);
    const errorsBefore = await hookCount(two, 'error');
    const clientErrorsBefore = await hookCount(two, 'client_error');
    const from = two.logLines.length;

    const res = await call(two, issuer);
    expect(res.status, JSON.stringify(res.body)).to.equal(503);
    expect(res.body.error).to.equal('unavailable');
    expect(res.body.message).to.not.match(/destroyed|shredded/);
    expect(res.body.message).to.include("this replica's keyring does not hold the tenant's key");
    expect(res.body.message).to.include('keyProvider.dir');

    const lines = two.logLines.slice(from).map((l) => JSON.parse(l) as LogLine);
    const failed = lines.filter((l) => l.status === 503);
    expect(failed, JSON.stringify(lines)).to.have.length(1);
    expect(failed[0]?.level).to.be.oneOf([50, 'error']);
    expect(JSON.stringify(failed[0])).to.include('tenant_key_missing');
    expect(failed[0]?.reason).to.equal('key: tenant_key_missing');
    expect(failed[0]?.err?.message, JSON.stringify(failed[0])).to.include(
      'of this replica holds no key of tenant hosp and never destroyed one',
    );
    expect(JSON.stringify(failed[0])).to.not.include('tenant_key_destroyed');

    expect(await hookCount(two, 'error')).to.equal(errorsBefore + 1);
    expect(await hookCount(two, 'client_error')).to.equal(clientErrorsBefore);

    // Nothing was created or shredded: the first replica still serves the tenant.
    expect(await two.deps.keyProvider.hasTenantKey('hosp')).to.equal(false);
    expect((await call(one, issuer)).status).to.equal(200);
  });

  it('still creates the key of a tenant new to the region on its first write', async () => {
    expect((await call(two, fresh)).status).to.equal(200);
    expect(await two.deps.keyProvider.hasTenantKey('newhosp')).to.equal(true);
    expect((await call(two, fresh)).status).to.equal(200);
  });

  it('keeps 409 "destroyed" for a key this keyring holds a tombstone for', async () => {
    await two.deps.keyProvider.destroyTenantKey('hosp');
    const res = await call(two, issuer);
    expect(res.status, JSON.stringify(res.body)).to.equal(409);
    expect(res.body.message).to.match(/key was destroyed in this region/);
  });
});

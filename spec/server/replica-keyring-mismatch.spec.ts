/**
 * Replicas of one region share its data plane; each must use the region's one keyring.
 *
 * - A replica started on another keyring folder (`keyProvider.dir`) refuses to start: the
 *   region's stores are bound to the region's keyring. It used to start, report ready, and
 *   create the key of any tenant new to the region in its own keyring on that tenant's first
 *   call, where the region's other replicas never find it.
 * - A replica on a stale copy of the region's keyring (restored from a backup taken before a
 *   tenant got its key) is the same keyring, so it starts, and holds no key for that tenant. Its
 *   calls used to answer 409 "the tenant's key was destroyed in this region (its data here was
 *   crypto-shredded)", counted as a client error and logged at info: on-call was told data was
 *   shredded when it was not. A key absent without a tombstone is a server-side fault: 503, an
 *   error log naming the likely cause, an `error` outcome. A destroyed key stays 409.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import request from 'supertest';
import { BootError } from '../../server/boot-failure.ts';
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

describe("replicas of a region on another keyring, or on a stale copy of the region's keyring", function () {
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
    // The second replica: same data plane, a copy of the region's keyring taken now, before
    // any tenant has a key (a keyring restored from an old backup).
    const stale = path.join(dir, 'keys-stale');
    fs.mkdirSync(stale, { mode: 0o700 });
    fs.copyFileSync(
      path.join(dir, 'keys-shared', 'r1.keyring.json'),
      path.join(stale, 'r1.keyring.json'),
    );
    fs.chmodSync(path.join(stale, 'r1.keyring.json'), 0o600);
    two = await buildTestApp({
      ...common,
      CELLCDS_REGIONS_FILE: regionsFile('two', stale),
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

  it('refuses to start a replica on another keyring folder, before any key is made in it', async () => {
    const wrong = path.join(dir, 'keys-wrong');
    const err = await buildTestApp({
      CELLCDS_REGION: 'r1',
      CELLCDS_SEED_DEMO: 'false',
      CELLCDS_REGIONS_FILE: regionsFile('three', wrong),
    }).then(
      async (t) => {
        await t.close();
        return undefined;
      },
      (e: unknown) => e,
    );
    expect(err, 'the replica started').to.be.instanceOf(BootError);
    expect(err).to.include({
      component: `key provider (keyring ${wrong})`,
      setting: 'CELLCDS_REGIONS_FILE keyProvider.dir',
    });
    expect((err as Error).message).to.match(/stores are bound to keyring kr-[0-9a-f]{32}/);
    const ring = JSON.parse(fs.readFileSync(path.join(wrong, 'r1.keyring.json'), 'utf8')) as {
      tenants: Record<string, unknown>;
    };
    expect(ring.tenants).to.deep.equal({});
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

/**
 * A canary tries a version on a share of a tenant's calls beside the pinned version; a canary
 * at 100 % is a full rollout without the step (a patient-safety review rolled a version whose
 * safety rules could never fire out to every tenant with `pack rollout … --canary-percent 100
 * --all`). A canary share is at most 50 % (MAX_CANARY_PERCENT): above it the admin API answers
 * 400 naming `canary.percent` and pointing to pinning the version instead, and `pack rollout`
 * exits 2 before sending anything. Real HTTP with a rule author's token, real CLI processes.
 */
import type http from 'node:http';
import type { AddressInfo } from 'node:net';
import { expect } from 'chai';
import request from 'supertest';
import { MAX_CANARY_PERCENT } from '../../server/admin-service.ts';
import { tinyPack } from '../helpers/packs.ts';
import { runCliAsync } from '../helpers/processes.ts';
import { buildTestApp, type TestApp } from '../helpers/test-app.ts';

interface Sub {
  pack: string;
  version: string;
  canary?: { version: string; percent: number };
}

describe('canary share: at most 50 %, a full rollout is a pin', function () {
  this.timeout(120_000);
  let t: TestApp;
  let server: http.Server;
  let url: string;
  let author: string;
  const op = (r: request.Test) => r.set('authorization', `Bearer ${t.adminToken}`);
  const subsOf = async (tenant: string): Promise<Sub[]> =>
    (await op(request(t.app).get(`/admin/tenants/${tenant}`))).body.subscriptions as Sub[];
  const put = (tenant: string, body: unknown) =>
    request(t.app)
      .put(`/admin/tenants/${tenant}/subscriptions/alpha`)
      .set('authorization', `Bearer ${author}`)
      .send(body as object);

  before(async () => {
    t = await buildTestApp({ CELLCDS_SEED_DEMO: 'false' });
    for (const version of ['1.0.0', '1.1.0']) {
      expect((await t.uploadPack(tinyPack('alpha', version))).status).to.equal(201);
    }
    await t.addTenant('hosp-a', { subscriptions: [{ pack: 'alpha', version: '1.0.0' }] });
    await t.addTenant('hosp-b', { subscriptions: [{ pack: 'alpha', version: '1.0.0' }] });
    const issued = await op(request(t.app).post('/admin/tokens')).send({ role: 'rule-author' });
    expect(issued.status).to.equal(201);
    author = (issued.body as { token: string }).token;
    server = await new Promise<http.Server>((resolve, reject) => {
      const s = t.app.listen(0, '127.0.0.1', () => {
        resolve(s);
      });
      s.once('error', reject);
    });
    url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  });
  after(async () => {
    await new Promise<void>((resolve) =>
      server.close(() => {
        resolve();
      }),
    );
    await t.close();
  });

  it('is 50 %', () => {
    expect(MAX_CANARY_PERCENT).to.equal(50);
  });

  for (const percent of [100, 51, 99.5]) {
    it(`refuses a rule author's canary at ${percent} % (400 canary.percent: pin it instead)`, async () => {
      const res = await put('hosp-a', {
        version: '1.0.0',
        canary: { version: '1.1.0', percent },
      });
      expect(res.status, JSON.stringify(res.body)).to.equal(400);
      expect(res.body.field).to.equal('canary.percent');
      expect(JSON.stringify(res.body)).to.match(
        /at most 50.*pin it instead \(version 1\.1\.0, no canary: pack rollout PACK --version 1\.1\.0\)/,
      );
      expect(await subsOf('hosp-a')).to.deep.equal([{ pack: 'alpha', version: '1.0.0' }]);
    });
  }

  it('takes a canary at 50 % and the pin that completes the rollout', async () => {
    const canary = await put('hosp-a', {
      version: '1.0.0',
      canary: { version: '1.1.0', percent: 50 },
    });
    expect(canary.status, JSON.stringify(canary.body)).to.equal(200);
    const pin = await put('hosp-a', { version: '1.1.0' });
    expect(pin.status).to.equal(200);
    expect(await subsOf('hosp-a')).to.deep.equal([{ pack: 'alpha', version: '1.1.0' }]);
    expect((await put('hosp-a', { version: '1.0.0' })).status).to.equal(200);
  });

  it("refuses the operator's whole-list PUT with a canary at 100 % too (400 naming the entry)", async () => {
    const res = await op(request(t.app).put('/admin/tenants/hosp-b/subscriptions')).send([
      { pack: 'alpha', version: '1.0.0', canary: { version: '1.1.0', percent: 100 } },
    ]);
    expect(res.status, JSON.stringify(res.body)).to.equal(400);
    expect(res.body.field).to.equal('subscriptions[0].canary.percent');
    expect(await subsOf('hosp-b')).to.deep.equal([{ pack: 'alpha', version: '1.0.0' }]);
  });

  it('pack rollout --canary-percent 100 --all: exit 2 pointing to the pin, no tenant touched', async () => {
    const r = await runCliAsync(
      [
        'pack',
        'rollout',
        'alpha',
        '--version',
        '1.0.0',
        '--canary-version',
        '1.1.0',
        '--canary-percent',
        '100',
        '--all',
        '--url',
        url,
        '--token',
        author,
      ],
      {
        ...process.env,
        CELLCDS_LOG_LEVEL: 'silent',
        CELLCDS_DATA_DIR: '/nonexistent/cellcds-author-host',
        CELLCDS_ADMIN_TOKEN: '',
      },
    );
    expect(r.status, r.stderr).to.equal(2);
    expect(r.stderr).to.include('--canary-percent 100 must be at most 50');
    expect(r.stderr).to.include('pack rollout alpha --version 1.1.0');
    for (const tenant of ['hosp-a', 'hosp-b']) {
      expect(await subsOf(tenant)).to.deep.equal([{ pack: 'alpha', version: '1.0.0' }]);
    }
  });
});

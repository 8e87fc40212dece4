/**
 * A rule author rolls a pack out from the CLI against a running server, with its own token
 * (no access to the server's data directory): `pack subscribers` lists who is on which version,
 * `pack rollout` moves the pinned version and canary of the pack for the tenants named (or all
 * of its subscribers) through `PUT /admin/tenants/{id}/subscriptions/{pack}`. Real CLI
 * processes against a real HTTP server.
 */
import type http from 'node:http';
import { expect } from 'chai';
import request from 'supertest';
import { runCliAsync } from '../helpers/processes.ts';
import { tinyPack } from '../helpers/packs.ts';
import { buildTestApp, type TestApp } from '../helpers/test-app.ts';

const PORT = 18563;
const URL = `http://127.0.0.1:${PORT}`;

describe('cellcds CLI: pack subscribers / pack rollout (a rule author, remote)', function () {
  this.timeout(240_000);
  let t: TestApp;
  let server: http.Server;
  let author: string;
  const op = (r: request.Test) => r.set('authorization', `Bearer ${t.adminToken}`);
  const subsOf = async (tenant: string) =>
    (await op(request(t.app).get(`/admin/tenants/${tenant}`))).body.subscriptions as unknown[];
  const cli = (args: string[], token?: string) =>
    runCliAsync([...args, '--url', URL, '--token', token ?? author], {
      ...process.env,
      CELLCDS_LOG_LEVEL: 'silent',
      // Nothing local: the author works from another host.
      CELLCDS_DATA_DIR: '/nonexistent/cellcds-author-host',
      CELLCDS_ADMIN_TOKEN: '',
    });

  before(async () => {
    t = await buildTestApp({ CELLCDS_SEED_DEMO: 'false' });
    for (const version of ['1.0.0', '1.1.0']) {
      expect((await t.uploadPack(tinyPack('alpha', version))).status).to.equal(201);
    }
    await t.addTenant('hosp-a', { subscriptions: [{ pack: 'alpha', version: '1.0.0' }] });
    await t.addTenant('hosp-b', { subscriptions: [{ pack: 'alpha', version: '1.0.0' }] });
    await t.addTenant('hosp-c');
    const issued = await op(request(t.app).post('/admin/tokens')).send({ role: 'rule-author' });
    expect(issued.status).to.equal(201);
    author = (issued.body as { token: string }).token;
    server = await new Promise<http.Server>((resolve, reject) => {
      const s = t.app.listen(PORT, '127.0.0.1', () => {
        resolve(s);
      });
      s.once('error', reject);
    });
  });
  after(async () => {
    await new Promise<void>((resolve) =>
      server.close(() => {
        resolve();
      }),
    );
    await t.close();
  });

  it('lists the subscribers of a pack', async () => {
    const r = await cli(['pack', 'subscribers', 'alpha']);
    expect(r.status, r.stderr).to.equal(0);
    expect(JSON.parse(r.stdout)).to.deep.equal([
      { tenant: 'hosp-a', version: '1.0.0' },
      { tenant: 'hosp-b', version: '1.0.0' },
    ]);
  });

  it('sends a canary share to every subscriber (--all), then promotes it for one tenant', async () => {
    const canary = await cli([
      'pack',
      'rollout',
      'alpha',
      '--version',
      '1.0.0',
      '--canary-version',
      '1.1.0',
      '--canary-percent',
      '10',
      '--all',
    ]);
    expect(canary.status, canary.stderr).to.equal(0);
    expect(canary.stdout).to.include('hosp-a').and.to.include('hosp-b');
    for (const tenant of ['hosp-a', 'hosp-b']) {
      expect(await subsOf(tenant)).to.deep.equal([
        { pack: 'alpha', version: '1.0.0', canary: { version: '1.1.0', percent: 10 } },
      ]);
    }
    const promote = await cli([
      'pack',
      'rollout',
      'alpha',
      '--version',
      '1.1.0',
      '--tenant',
      'hosp-a',
    ]);
    expect(promote.status, promote.stderr).to.equal(0);
    expect(await subsOf('hosp-a')).to.deep.equal([{ pack: 'alpha', version: '1.1.0' }]);
    expect(await subsOf('hosp-b')).to.deep.equal([
      { pack: 'alpha', version: '1.0.0', canary: { version: '1.1.0', percent: 10 } },
    ]);
  });

  it('refuses a tenant without the pack (exit 1, the server says why), bad usage (exit 2)', async () => {
    const other = await cli([
      'pack',
      'rollout',
      'alpha',
      '--version',
      '1.1.0',
      '--tenant',
      'hosp-c',
    ]);
    expect(other.status).to.equal(1);
    expect(other.stderr).to.include('403').and.to.include('hosp-c');
    expect(await subsOf('hosp-c')).to.deep.equal([]);
    // An operator's rollout moves versions only too: it never gives a tenant the pack.
    const byOperator = await cli(
      ['pack', 'rollout', 'alpha', '--version', '1.1.0', '--tenant', 'hosp-c'],
      t.adminToken,
    );
    expect(byOperator.status).to.equal(1);
    expect(byOperator.stderr).to.include('409');
    expect(await subsOf('hosp-c')).to.deep.equal([]);
    const usage: string[][] = [
      ['pack', 'rollout', 'alpha', '--version', '1.1.0'],
      ['pack', 'rollout', 'alpha', '--version', '1.1.0', '--all', '--tenant', 'hosp-a'],
      ['pack', 'rollout', 'alpha', '--version', '1.1.0', '--canary-version', '1.0.0', '--all'],
    ];
    for (const args of usage) {
      const r = await cli(args);
      expect(r.status, `${args.join(' ')}: ${r.stderr}`).to.equal(2);
    }
    const missing = await cli(['pack', 'rollout', 'alpha', '--version', '9.9.9', '--all']);
    expect(missing.status, missing.stderr).to.equal(2);
    expect(missing.stderr).to.include('version');
    expect(await subsOf('hosp-a')).to.deep.equal([{ pack: 'alpha', version: '1.1.0' }]);
  });
});

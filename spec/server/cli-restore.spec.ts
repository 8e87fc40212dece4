/**
 * `cellcds restore` against a running server: a backup that cannot be authenticated (format 1)
 * is refused with the server's reason, and restored only with `--allow-unauthenticated`.
 * Real processes, real files.
 */
import { spawn } from 'node:child_process';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import { expect } from 'chai';
import request from 'supertest';
import { buildTestApp, type TestApp } from '../helpers/test-app.ts';
import { copyDir, downgradeToFormat1 } from '../tenants/data-plane/backup-tamper.ts';
import { invocation } from '../tenants/data-plane/helpers.ts';

const TENANT = 'cli-hosp';

function cli(
  dataDir: string,
  args: string[],
): Promise<{ status: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, ['--import', 'tsx', 'server/cli.ts', ...args], {
      env: { ...process.env, CELLCDS_DATA_DIR: dataDir, CELLCDS_LOG_LEVEL: 'silent' },
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('close', (status) => {
      resolve({ status, stdout, stderr });
    });
  });
}

describe('cellcds restore: unauthenticated backups', function () {
  this.timeout(120_000);
  let t: TestApp;
  let server: ReturnType<TestApp['app']['listen']>;
  let url: string;

  before(async () => {
    t = await buildTestApp({ CELLCDS_SEED_DEMO: 'false' });
    await t.addTenant(TENANT);
    server = t.app.listen(0, '127.0.0.1');
    await new Promise((r) => server.once('listening', r));
    url = `http://127.0.0.1:${String((server.address() as AddressInfo).port)}`;
  });
  after(async () => {
    server.close();
    await t.close();
  });

  it('refuses a format-1 backup (exit 1, 422 unauthenticated) and restores it with --allow-unauthenticated', async () => {
    await t.deps.stores.store(TENANT).saveInvocation(invocation('inv-1'));
    const made = await request(t.app)
      .post(`/admin/tenants/${TENANT}/backups`)
      .set('authorization', `Bearer ${t.adminToken}`);
    expect(made.status).to.equal(201);
    const old = copyDir(made.body.path as string, path.join(t.deps.backupDir, 'format1'));
    downgradeToFormat1(old);
    await t.deps.stores.store(TENANT).saveInvocation(invocation('inv-2'));
    const base = ['restore', 'format1', '--tenant', TENANT, '--url', url, '--token', t.adminToken];

    const refused = await cli(t.dataDir, base);
    expect(refused.status, refused.stderr).to.equal(1);
    expect(refused.stderr).to.include('422');
    expect(refused.stderr).to.include('(unauthenticated)');
    expect((await t.deps.stores.store(TENANT).listInvocations()).map((r) => r.id)).to.deep.equal([
      'inv-1',
      'inv-2',
    ]);

    const ok = await cli(t.dataDir, [...base, '--allow-unauthenticated']);
    expect(ok.status, ok.stderr).to.equal(0);
    expect(JSON.parse(ok.stdout)).to.include({ tenant: TENANT, authenticated: false });
    expect((await t.deps.stores.store(TENANT).listInvocations()).map((r) => r.id)).to.deep.equal([
      'inv-1',
    ]);
  });
});

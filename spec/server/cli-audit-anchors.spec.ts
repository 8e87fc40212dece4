/**
 * `cellcds audit head` and `cellcds audit verify --anchor`, and the evidence report's record
 * accesses and anchors, as an operator runs them (real processes; the server is this process's
 * app on a local port, on the same data directory). The rewrite attack runs on the real SQLite
 * files: without anchors verify still says ok (the documented limit); with an anchor taken
 * before, it fails naming the seq.
 */
import fs from 'node:fs';
import type { Server } from 'node:http';
import path from 'node:path';
import { expect } from 'chai';
import request from 'supertest';
import {
  controlPlaneEvent,
  findFile,
  rewriteChain,
  tenantEvent,
} from '../helpers/audit-rewrite.ts';
import { runCliAsync } from '../helpers/processes.ts';
import { buildTestApp, type TestApp } from '../helpers/test-app.ts';
import { invocation } from '../tenants/data-plane/helpers.ts';

interface Head {
  chain: string;
  seq: number;
  hash: string;
  at: string;
}

describe('cellcds audit head / verify --anchor, and the evidence report', function () {
  this.timeout(240_000);
  let t: TestApp;
  let server: Server;
  let url: string;
  let adminA: string;

  const env = (): NodeJS.ProcessEnv => ({
    ...process.env,
    CELLCDS_DATA_DIR: t.dataDir,
    CELLCDS_PUBLIC_URL: url,
    CELLCDS_ADMIN_TOKEN: t.adminToken,
    CELLCDS_LOG_LEVEL: 'silent',
    CELLCDS_SEED_DEMO: 'false',
  });
  const cli = (...args: string[]) => runCliAsync(args, env());
  /** A tenant's chain is read through the server. */
  const viaServer = () => ['--url', url, '--token', t.adminToken];
  const readRecord = async (id: string) => {
    const res = await request(t.app)
      .get(`/admin/tenants/hosp-a/invocations/${id}`)
      .set('authorization', `Bearer ${adminA}`);
    expect(res.status).to.equal(200);
  };

  beforeEach(async () => {
    t = await buildTestApp();
    await t.addTenant('hosp-a');
    adminA = (
      await request(t.app)
        .post('/admin/tokens')
        .set('authorization', `Bearer ${t.adminToken}`)
        .send({ role: 'tenant-admin', tenant: 'hosp-a' })
    ).body.token as string;
    const store = t.deps.stores.store('hosp-a');
    for (const id of ['inv-1', 'inv-2']) {
      await store.saveInvocation(invocation(id));
    }
    await readRecord('inv-1');
    server = await new Promise<Server>((resolve) => {
      const s = t.app.listen(0, '127.0.0.1', () => {
        resolve(s);
      });
    });
    const address = server.address();
    url = `http://127.0.0.1:${String(typeof address === 'object' && address ? address.port : 0)}`;
  });
  afterEach(async () => {
    await new Promise((resolve) => server.close(resolve));
    await t.close();
  });

  it('prints heads; after a rewrite, verify alone passes, verify --anchor fails naming the seq (exit 1)', async () => {
    const cpHead = await cli('audit', 'head');
    expect(cpHead.status, cpHead.stderr).to.equal(0);
    const cp = JSON.parse(cpHead.stdout) as Head;
    expect(cp).to.have.all.keys('chain', 'seq', 'hash', 'at');
    expect(cp.chain).to.equal('control-plane');
    const tenantHead = await cli('audit', 'head', '--tenant', 'hosp-a', ...viaServer());
    expect(tenantHead.status, tenantHead.stderr).to.equal(0);
    const a = JSON.parse(tenantHead.stdout) as Head;
    expect(a.chain).to.equal('tenant:hosp-a');

    // Kept as printed (a file), and as SEQ:HASH.
    const kept = path.join(t.dataDir, 'kept-head.json');
    fs.writeFileSync(kept, cpHead.stdout);
    const held = await cli('audit', 'verify', '--anchor', kept);
    expect(held.status, held.stderr).to.equal(0);
    expect(JSON.parse(held.stdout)).to.deep.include({ ok: true });

    await readRecord('inv-2');
    const read = (await t.deps.controlPlane.audit.list({ type: 'records.read' }))[0]!;
    await rewriteChain(
      findFile(t.dataDir, 'control.sqlite'),
      read.seq,
      'at, type, outcome, tenant, actor, detail',
      controlPlaneEvent,
    );
    const tenantRead = (await t.deps.stores.store('hosp-a').audit.list()).find(
      (e) => e.type === 'record.read',
    )!;
    await rewriteChain(
      findFile(t.dataDir, 'hosp-a.sqlite'),
      tenantRead.seq,
      'at, type, outcome, actor, detail',
      tenantEvent('hosp-a'),
    );

    const alone = await cli('audit', 'verify');
    expect(alone.status, alone.stderr).to.equal(0);
    const aloneTenant = await cli('audit', 'verify', '--tenant', 'hosp-a', ...viaServer());
    expect(aloneTenant.status, aloneTenant.stderr).to.equal(0);

    const anchored = await cli('audit', 'verify', '--anchor', kept);
    expect(anchored.status).to.equal(1);
    expect(anchored.stderr).to.include(
      `audit chain of the control plane no longer holds the kept anchor at seq ${String(cp.seq)}`,
    );
    const anchoredTenant = await cli(
      'audit',
      'verify',
      '--tenant',
      'hosp-a',
      '--anchor',
      `${String(a.seq)}:${a.hash}`,
      ...viaServer(),
    );
    expect(anchoredTenant.status).to.equal(1);
    expect(anchoredTenant.stderr).to.include(
      `audit chain of tenant hosp-a no longer holds the kept anchor at seq ${String(a.seq)}`,
    );
  });

  it('refuses a malformed anchor, a missing file and a file of another chain (exit 2)', async () => {
    const other = path.join(t.dataDir, 'other-chain.json');
    fs.writeFileSync(
      other,
      JSON.stringify({ chain: 'tenant:hosp-a', seq: 1, hash: 'a'.repeat(64), at: 'x' }),
    );
    const cases: Array<[string, RegExp]> = [
      ['3:abc', /anchor: "3:abc" is not SEQ:HASH/],
      ['-1:' + 'a'.repeat(64), /neither SEQ:HASH nor a readable file/],
      [path.join(t.dataDir, 'no-such-file'), /neither SEQ:HASH nor a readable file/],
      [other, /holds no anchor of the control-plane chain/],
    ];
    for (const [anchor, message] of cases) {
      const r = await cli('audit', 'verify', `--anchor=${anchor}`);
      expect(r.status, `${anchor}: ${r.stderr}`).to.equal(2);
      expect(r.stderr).to.match(message);
    }
  });

  it('evidence lists record reads and replays and its own run, and holds anchors verify takes', async () => {
    const outDir = path.join(t.dataDir, 'evidence');
    const from = new Date(Date.now() - 3_600_000).toISOString();
    const to = new Date(Date.now() + 3_600_000).toISOString();
    const r = await cli('evidence', '--from', from, '--to', to, '--out', outDir);
    expect(r.status, r.stderr).to.equal(0);
    const files = fs.readdirSync(outDir);
    const md = fs.readFileSync(
      path.join(
        outDir,
        files.find((f) => f.endsWith('.md'))!,
      ),
      'utf8',
    );
    const json = path.join(
      outDir,
      files.find((f) => f.endsWith('.json'))!,
    );
    expect(md).to.match(
      /\| hosp-a \| records\.read \| success \| tenant-admin:tok_[0-9a-f]+ \| inv-1 \|/,
    );
    expect(md).to.match(/\| evidence\.report \| success \| platform-operator:cli \|/);
    const [run] = await t.deps.controlPlane.audit.list({ type: 'evidence.report' });
    expect(run).to.deep.include({ actor: 'platform-operator:cli' });
    expect(run!.detail).to.deep.equal({ from, to });

    // The report's heads are anchors: verify takes the report itself.
    const cp = await cli('audit', 'verify', '--anchor', json);
    expect(cp.status, cp.stderr).to.equal(0);
    expect(JSON.parse(cp.stdout).anchors).to.have.length(1);
    const tenant = await cli(
      'audit',
      'verify',
      '--tenant',
      'hosp-a',
      '--anchor',
      json,
      ...viaServer(),
    );
    expect(tenant.status, tenant.stderr).to.equal(0);
    expect(JSON.parse(tenant.stdout).anchors).to.have.length(1);
  });
});

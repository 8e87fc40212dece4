import type { ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import { freePort, runCli, runCliAsync, startServer } from '../helpers/processes.ts';
import { createLocalKeyProvider, openRegionStores } from '../../tenants/index.ts';

/**
 * The real server process as an operator runs it: key rotation with a live progress bar from
 * the CLI, backups, audit verification, and a SIGKILL right after a 200 (the record is there).
 */
describe('operating a running server: rotation from the CLI, and a SIGKILL after a 200', function () {
  this.timeout(180_000);
  let dataDir: string;
  let server: ChildProcess;
  let port: number;
  const token = `op-${'z'.repeat(40)}`;
  const env = () => ({
    ...process.env,
    PORT: String(port),
    CELLCDS_DATA_DIR: dataDir,
    CELLCDS_ADMIN_TOKEN: token,
    CELLCDS_PUBLIC_URL: '',
    CELLCDS_LOG_LEVEL: 'warn',
  });
  const cli = (args: string[]) => runCli(args, env());
  const cliAsync = (args: string[]) => runCliAsync(args, env());

  before(async () => {
    dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-dur-'));
    port = await freePort();
    server = (await startServer(env())).child;
  });
  after(() => {
    server.kill('SIGKILL');
    fs.rmSync(dataDir, { recursive: true, force: true });
  });

  it('rotates a tenant key from the CLI with a live progress bar, calls going on meanwhile', async () => {
    for (let i = 0; i < 5; i++) {
      expect(cli(['call', 'order-sign', '--demo', '--json']).status).to.equal(0);
    }
    const [rot, during] = await Promise.all([
      cliAsync(['keys', 'rotate', '--tenant', 'demo', '--wait']),
      cliAsync(['call', 'patient-view', '--demo', '--json']),
    ]);
    expect(rot.status, rot.stderr).to.equal(0);
    expect(rot.stderr).to.match(/rewrap\.demo\.\d+ \[[#.]+\] \d+\/\d+ +\d+ rec\/s +ETA/);
    expect(JSON.parse(rot.stdout)).to.include({ status: 'done' });
    expect(during.status, during.stderr).to.equal(0);
    const status = cli(['keys', 'status', '--tenant', 'demo']);
    expect(JSON.parse(status.stdout).primary).to.equal(2);
  });

  it('backs a tenant up and verifies its audit chain from the CLI', () => {
    const b = cli(['backup', '--tenant', 'demo']);
    expect(b.status, b.stderr).to.equal(0);
    expect(fs.existsSync(JSON.parse(b.stdout).path as string)).to.equal(true);
    const v = cli(['audit', 'verify', '--tenant', 'demo']);
    expect(v.status, v.stderr).to.equal(0);
    expect(JSON.parse(v.stdout).ok).to.equal(true);
  });

  it('writes the evidence report (JSON and Markdown) listing the rotation and admin actions of this run', () => {
    const outDir = path.join(dataDir, 'evidence');
    const from = new Date(Date.now() - 3600_000).toISOString();
    const to = new Date(Date.now() + 3600_000).toISOString();
    const r = cli(['evidence', '--from', from, '--to', to, '--out', outDir]);
    expect(r.status, r.stderr).to.equal(0);
    const files = fs.readdirSync(outDir);
    const json = files.find((f) => f.endsWith('.json'));
    const md = files.find((f) => f.endsWith('.md'));
    expect(json).to.be.a('string');
    expect(md).to.be.a('string');
    const report = fs.readFileSync(path.join(outDir, json!), 'utf8');
    expect(report).to.include('key.rotate');
    expect(report).to.include('admin.tenant.create');
    expect(report).to.include('backup');
    expect(fs.readFileSync(path.join(outDir, md!), 'utf8')).to.match(/^# /m);
  });

  it('keeps the record of a call that got a 200, after a SIGKILL of the server', async () => {
    const call = cli(['call', 'order-sign', '--demo', '--json']);
    expect(call.status, call.stderr).to.equal(0);
    const cards = (JSON.parse(call.stdout) as { cards: Array<{ uuid: string }> }).cards;
    expect(cards.length).to.be.greaterThan(0);
    server.kill('SIGKILL');
    await new Promise((r) => server.once('exit', r));
    const keyProvider = await createLocalKeyProvider({
      keyDir: path.join(dataDir, 'keys'),
      region: 'local',
    });
    const stores = await openRegionStores({ region: 'local', dataDir, keyProvider });
    try {
      const store = stores.store('demo');
      const id = await store.findCard(cards[0]!.uuid);
      expect(id, 'the acknowledged call has its record').to.be.a('string');
      const record = await store.readInvocation(id!);
      expect((record.secret.cards as Array<{ uuid: string }>).map((c) => c.uuid)).to.deep.equal(
        cards.map((c) => c.uuid),
      );
    } finally {
      await stores.close();
    }
  });
});

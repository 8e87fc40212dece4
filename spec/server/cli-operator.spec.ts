/**
 * The operator's CLI gaps an on-call engineer hit (real processes on a real data directory,
 * prepared by the app in this process):
 * - invalid input to `tenant` / `token` / `audit list` is a usage error (exit 2, the message
 *   unchanged), while a failed operation (not found, conflict) stays exit 1;
 * - `tenant unsubscribe <tenant> <pack>` (or `--pack`), audited like `tenant subscribe`;
 * - `audit list --request-id <id>` finds the event of the request id a refusal named;
 * - `backup list [--tenant T]` lists the region's backups, newest first.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import request from 'supertest';
import { runCliAsync, type CliResult } from '../helpers/processes.ts';
import { tinyPack } from '../helpers/packs.ts';
import { buildTestApp, type TestApp } from '../helpers/test-app.ts';
import { copyDir, downgradeToFormat1 } from '../tenants/data-plane/backup-tamper.ts';
import { invocation } from '../tenants/data-plane/helpers.ts';

const SINGLE_JWK = {
  kty: 'EC',
  crv: 'P-384',
  kid: 'k1',
  x: 'hBHtLm6g6LIWL3wPl2RQb6Dt7hd8sKK7jXgyOshsa8Q7f0ydtBdKNUqPHtcWz11r',
  y: 'LqaUdj4wTtmKNyuD5Iab4U5LoTgRWpDJBN5Jfbx8Bq7d9WntCw1Ue9djaNn-OKBs',
};

/** Runs the commands a few at a time (two cores): their results in the same order. */
async function runAll(
  commands: ReadonlyArray<{ args: string[]; env?: NodeJS.ProcessEnv }>,
  run: (args: string[], env?: NodeJS.ProcessEnv) => Promise<CliResult>,
  concurrency = 2,
): Promise<CliResult[]> {
  const results: CliResult[] = new Array<CliResult>(commands.length);
  let next = 0;
  const worker = async () => {
    while (next < commands.length) {
      const i = next++;
      const c = commands[i]!;
      results[i] = await run(c.args, c.env);
    }
  };
  await Promise.all(Array.from({ length: concurrency }, worker));
  return results;
}

describe('cellcds CLI: operator commands', function () {
  this.timeout(240_000);
  let t: TestApp;
  let work: string;
  /** The request id a refused call was given (X-Request-Id). */
  let refusedCall: string;
  /** Backup folder names, oldest first. */
  const made: Array<{ name: string; tenant: string }> = [];

  const env = (extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv => ({
    ...process.env,
    CELLCDS_DATA_DIR: t.dataDir,
    CELLCDS_ADMIN_TOKEN: t.adminToken,
    CELLCDS_LOG_LEVEL: 'silent',
    CELLCDS_SEED_DEMO: 'false',
    ...extra,
  });
  const cli = (args: string[], extra?: NodeJS.ProcessEnv) => runCliAsync(args, env(extra));
  const backupDir = () => t.deps.backupDir;

  before(async () => {
    work = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-cli-operator-'));
    t = await buildTestApp({ CELLCDS_SEED_DEMO: 'false' });
    for (const id of ['alpha', 'beta']) {
      expect((await t.uploadPack(tinyPack(id))).status).to.equal(201);
    }
    await t.addTenant('hosp-a', {
      subscriptions: [
        { pack: 'alpha', version: '1.0.0' },
        { pack: 'beta', version: '1.0.0' },
      ],
    });
    await t.addTenant('hosp-b');
    const refused = await request(t.app)
      .get('/cds-services')
      .set('authorization', 'Bearer not.a.token');
    expect(refused.status).to.equal(401);
    refusedCall = refused.headers['x-request-id'] as string;
    await request(t.app).get('/cds-services').set('authorization', 'Bearer other.bad.token');
    await t.deps.failureAudit.flush();
    // Backups: hosp-a twice (one record more the second time), hosp-b once.
    await t.deps.stores.store('hosp-a').saveInvocation(invocation('inv-1'));
    await t.deps.stores.store('hosp-b').saveInvocation(invocation('inv-b'));
    for (const tenant of ['hosp-a', 'hosp-b', 'hosp-a']) {
      if (made.length === 2) {
        await t.deps.stores.store('hosp-a').saveInvocation(invocation('inv-2'));
      }
      const res = await request(t.app)
        .post(`/admin/tenants/${tenant}/backups`)
        .set('authorization', `Bearer ${t.adminToken}`);
      expect(res.status, JSON.stringify(res.body)).to.equal(201);
      made.push({ name: path.basename(res.body.path as string), tenant });
      await new Promise((r) => setTimeout(r, 20));
    }
  });
  after(async () => {
    await t.close();
    fs.rmSync(work, { recursive: true, force: true });
  });

  it('invalid input is a usage error (exit 2) with its message unchanged; a failed operation stays 1', async () => {
    const single = path.join(work, 'single-jwk.json');
    fs.writeFileSync(single, JSON.stringify(SINGLE_JWK));
    const add = (...extra: string[]) => [
      'tenant',
      'add',
      '--name',
      'New',
      '--iss',
      'https://ehr.new.example',
      ...extra,
    ];
    const cases: Array<[string, string[], number, RegExp]> = [
      [
        'tenant add: a bad id',
        add('--id', 'Bad Id', '--jwks-uri', 'https://ehr.new.example/jwks'),
        2,
        /^cellcds: id: must match /,
      ],
      [
        'tenant add: an http key set URL',
        add('--id', 'new-one', '--jwks-uri', 'http://ehr.new.example/jwks'),
        2,
        /^cellcds: issuers\[0\]\.jwksUri: must be https/,
      ],
      [
        'tenant add: a single JWK for a key set',
        add('--id', 'new-two', '--jwks-file', single),
        2,
        /wrap the key in \{"keys": \[ \.\.\. \]\}/,
      ],
      [
        'tenant subscribe: a version not in the catalog',
        ['tenant', 'subscribe', 'hosp-b', '--pack', 'alpha', '--version', '9.9.9'],
        2,
        /^cellcds: version: this pack version is not in the catalog/,
      ],
      [
        'token create: an unknown role',
        ['token', 'create', '--role', 'wizard'],
        2,
        /^cellcds: role: must be one of /,
      ],
      [
        'audit list: a request id that is none',
        ['audit', 'list', '--request-id', 'a b'],
        2,
        /^cellcds: requestId: must be a single request id/,
      ],
      [
        'tenant unsubscribe: no pack named',
        ['tenant', 'unsubscribe', 'hosp-a'],
        2,
        /name the pack/,
      ],
      [
        'backup list: a tenant that is no tenant id',
        ['backup', 'list', '--tenant', 'Bad Id'],
        2,
        /--tenant/,
      ],
      // Failed operations: exit 1.
      [
        'tenant unsubscribe: an unknown tenant',
        ['tenant', 'unsubscribe', 'nope', 'alpha'],
        1,
        /tenant not found/,
      ],
    ];
    const results = await runAll(
      cases.map(([, args]) => ({ args })),
      (args) => cli(args),
    );
    cases.forEach(([name, , status, message], i) => {
      const r = results[i]!;
      expect(r.status, `${name}: ${r.stderr}`).to.equal(status);
      expect(r.stderr, name).to.match(message);
    });
    // Nothing was registered.
    expect((await t.deps.controlPlane.tenants.list()).map((x) => x.id).sort()).to.deep.equal([
      'hosp-a',
      'hosp-b',
    ]);
  });

  it('tenant unsubscribe: removes one pack (positional or --pack), audited as a subscription change', async () => {
    const before = (await t.deps.controlPlane.audit.list()).length;
    const r = await cli(['tenant', 'unsubscribe', 'hosp-a', 'beta']);
    expect(r.status, r.stderr).to.equal(0);
    expect(JSON.parse(r.stdout)).to.deep.equal([{ pack: 'alpha', version: '1.0.0' }]);
    expect((await t.deps.controlPlane.tenants.get('hosp-a')).subscriptions).to.deep.equal([
      { pack: 'alpha', version: '1.0.0' },
    ]);

    const again = await cli(['tenant', 'unsubscribe', 'hosp-a', 'beta']);
    expect(again.status, again.stderr).to.equal(2);
    expect(again.stderr).to.include(
      'cellcds: tenant hosp-a is not subscribed to pack beta (its subscriptions: alpha@1.0.0)',
    );

    const last = await cli(['tenant', 'unsubscribe', 'hosp-a', '--pack', 'alpha']);
    expect(last.status, last.stderr).to.equal(0);
    expect(JSON.parse(last.stdout)).to.deep.equal([]);

    const events = (await t.deps.controlPlane.audit.list({ tenant: 'hosp-a' })).slice(-2);
    expect((await t.deps.controlPlane.audit.list()).length).to.equal(before + 2);
    expect(events.map((e) => [e.type, e.outcome, e.actor, e.detail])).to.deep.equal([
      [
        'admin.tenant.subscriptions',
        'success',
        'platform-operator:cli',
        { subscriptions: 'alpha@1.0.0', pack: 'beta' },
      ],
      [
        'admin.tenant.subscriptions',
        'success',
        'platform-operator:cli',
        { subscriptions: '', pack: 'alpha' },
      ],
    ]);
  });

  it('audit list --request-id: the event of the request id a refusal named, alone', async () => {
    const r = await cli(['audit', 'list', '--request-id', refusedCall]);
    expect(r.status, r.stderr).to.equal(0);
    const events = JSON.parse(r.stdout) as Array<{ type: string; detail: Record<string, unknown> }>;
    expect(events).to.have.length(1);
    expect(events[0]?.type).to.equal('auth.failure');
    expect(events[0]?.detail.requestId).to.equal(refusedCall);
  });

  it('backup list: every backup of the region, newest first, with its tenant, time, size and counts', async () => {
    // A format-1 copy (restore needs --allow-unauthenticated), a folder that is no backup (a
    // migration's checkpoints) and one whose manifest is broken.
    const format1 = copyDir(path.join(backupDir(), made[0]!.name), path.join(backupDir(), 'old'));
    downgradeToFormat1(format1);
    fs.mkdirSync(path.join(backupDir(), 'migrations'), { recursive: true });
    fs.mkdirSync(path.join(backupDir(), 'broken'));
    fs.writeFileSync(path.join(backupDir(), 'broken', 'manifest.json'), '{"format":');

    const empty = path.join(work, 'empty-data');
    fs.mkdirSync(empty);
    const [human, json, onlyA, none, nothing] = await runAll(
      [
        { args: ['backup', 'list'] },
        { args: ['backup', 'list', '--json'] },
        { args: ['backup', 'list', '--tenant', 'hosp-a', '--json'] },
        { args: ['backup', 'list', '--tenant', 'hosp-c'] },
        { args: ['backup', 'list'], env: { CELLCDS_DATA_DIR: empty } },
      ],
      (args, extra) => cli(args, extra),
    );

    const list = JSON.parse(json!.stdout) as Array<{
      name: string;
      tenant: string;
      region: string;
      createdAt: string;
      bytes: number;
      counts: { invocations: number; feedback: number; auditEvents: number };
      authenticated: boolean;
    }>;
    expect(json!.status, json!.stderr).to.equal(0);
    const newestFirst = [...made].reverse().map((m) => m.name);
    // The format-1 copy keeps its original's time: the oldest, after its original (by name).
    expect(list.map((b) => b.name)).to.deep.equal([...newestFirst, 'old']);
    expect(list.map((b) => b.tenant)).to.deep.equal(['hosp-a', 'hosp-b', 'hosp-a', 'hosp-a']);
    expect(list[0]).to.deep.include({ region: 'local', authenticated: true });
    expect(list[0]!.counts.invocations).to.equal(2);
    expect(list[2]!.counts.invocations).to.equal(1);
    expect(list[3]!.authenticated).to.equal(false);
    expect(list[0]!.bytes).to.be.greaterThan(0);
    const sorted = [...list].sort((a, b) => Date.parse(b.createdAt) - Date.parse(a.createdAt));
    expect(sorted.map((b) => b.createdAt)).to.deep.equal(list.map((b) => b.createdAt));
    // The broken one is named on stderr; the folder that is no backup is not.
    expect(json!.stderr).to.include('broken');
    expect(json!.stderr).to.not.include('migrations');

    expect(human!.status, human!.stderr).to.equal(0);
    expect(human!.stdout).to.include(`backups in ${backupDir()}, newest first`);
    const rows = human!.stdout.split('\n').filter((l) => /^(hosp-|old)/.test(l));
    expect(rows.map((l) => l.split(/\s+/)[0])).to.deep.equal([...newestFirst, 'old']);
    expect(rows[0]).to.match(/ hosp-a +\d{4}-\d\d-\d\dT\S+Z +[\d.]+ (B|KiB|MiB) +2 invocations/);
    expect(rows[3]).to.include('format 1: restore needs --allow-unauthenticated');
    expect(human!.stdout).to.include('npx cellcds restore');

    expect(onlyA!.status, onlyA!.stderr).to.equal(0);
    expect((JSON.parse(onlyA!.stdout) as typeof list).map((b) => b.name)).to.deep.equal([
      made[2]!.name,
      made[0]!.name,
      'old',
    ]);

    expect(none!.status, none!.stderr).to.equal(0);
    expect(none!.stdout.trim()).to.equal(`no backups of tenant hosp-c in ${backupDir()}`);

    expect(nothing!.status, nothing!.stderr).to.equal(0);
    expect(nothing!.stdout.trim()).to.equal(
      `no backups in ${path.join(empty, 'backups', 'local')}`,
    );
    expect(fs.readdirSync(empty)).to.deep.equal([]);
  });
});

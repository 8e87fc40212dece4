/**
 * Only the server makes a region's keyring or its first keyring binding. `cellcds migrate` and
 * `cellcds evidence` open a region's data plane outside the server: on a region no server opened
 * yet, or with this host's keyring folder for it empty, they refuse (exit 1) with the region, the
 * keyring file they looked at and what to do, and make nothing: a migration used to make a fresh
 * keyring there and bind the target region to it, so the region's real servers then refused to
 * boot and the tenant's data was under keys they did not hold.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import { freePort, runCli, startServer } from '../helpers/processes.ts';
import type { ServerProcess } from '../helpers/processes.ts';
import { parseRegionMatrix } from '../../server/regions.ts';
import { TestIssuer } from '../helpers/test-issuer.ts';
import { invocation } from '../tenants/data-plane/helpers.ts';
import { createLocalKeyProvider, openControlPlane, openRegionStores } from '../../tenants/index.ts';

const TENANT = 'acme-health';

describe('operator commands never make a keyring or a first keyring binding', function () {
  this.timeout(180_000);
  let root: string;
  const ports: Record<string, number> = {};
  let server: ServerProcess | undefined;

  const dataDir = () => path.join(root, 'data');
  const keyDir = (id: string) => path.join(root, id, 'keys');
  const keyringFile = (id: string) => path.join(keyDir(id), `${id}.keyring.json`);
  const bindingFile = (id: string) => path.join(root, id, 'data', id, '.keyring-binding.json');
  const env = (extra: Record<string, string> = {}): NodeJS.ProcessEnv => {
    const e: NodeJS.ProcessEnv = {
      ...process.env,
      CELLCDS_DATA_DIR: dataDir(),
      CELLCDS_REGIONS_FILE: path.join(root, 'regions.json'),
      CELLCDS_REGION: 'us-east',
      CELLCDS_ADMIN_TOKEN: `op-${'k'.repeat(40)}`,
      CELLCDS_SEED_DEMO: 'false',
      CELLCDS_LOG_LEVEL: 'warn',
      PORT: String(ports['us-east']),
      ...extra,
    };
    delete e.CELLCDS_PUBLIC_URL;
    return e;
  };

  beforeEach(async () => {
    root = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-opkr-'));
    fs.mkdirSync(dataDir());
    ports['us-east'] = await freePort();
    ports['eu-west'] = await freePort();
    const region = (id: string, jurisdiction: string) => ({
      id,
      jurisdiction,
      publicUrl: `http://127.0.0.1:${String(ports[id])}`,
      storage: { dataDir: path.join(root, id, 'data') },
      backupDir: path.join(root, id, 'backups'),
      keyProvider: { kind: 'local-keyring', dir: keyDir(id) },
    });
    fs.writeFileSync(
      path.join(root, 'regions.json'),
      JSON.stringify({ regions: [region('us-east', 'US'), region('eu-west', 'EU')] }),
    );
  });
  afterEach(() => {
    server?.child.kill('SIGKILL');
    server = undefined;
    fs.rmSync(root, { recursive: true, force: true });
  });

  /** A tenant at home in us-east, which its server opened, with two records. */
  async function seedTenant(): Promise<void> {
    const issuer = await TestIssuer.create({ iss: 'https://ehr.example.org' });
    const cp = await openControlPlane({ storage: path.join(dataDir(), 'control.sqlite') });
    try {
      const matrix = parseRegionMatrix(
        JSON.parse(fs.readFileSync(path.join(root, 'regions.json'), 'utf8')),
        'spec',
        root,
      );
      await cp.tenants.create(
        {
          id: TENANT,
          name: 'Acme Health',
          region: 'us-east',
          issuers: [{ iss: 'https://ehr.example.org', jwks: issuer.publicJwks() }],
          residency: { processingRegions: ['us-east', 'eu-west'] },
        },
        { regions: matrix.regions },
      );
    } finally {
      await cp.close();
    }
    const keyProvider = await createLocalKeyProvider({
      keyDir: keyDir('us-east'),
      region: 'us-east',
    });
    const stores = await openRegionStores({
      region: 'us-east',
      dataDir: path.join(root, 'us-east', 'data'),
      keyProvider,
    });
    await stores.store(TENANT).saveInvocation(invocation('inv-1'));
    await stores.store(TENANT).saveInvocation(invocation('inv-2'));
    await stores.close();
  }

  async function tenantNow(): Promise<{ region: string; status: string }> {
    const cp = await openControlPlane({ storage: path.join(dataDir(), 'control.sqlite') });
    try {
      return await cp.tenants.get(TENANT);
    } finally {
      await cp.close();
    }
  }

  it('migrate into a region no server opened, with an empty keyring folder: exit 1, nothing made, tenant not suspended; after its server started once: migrates', async () => {
    await seedTenant();
    fs.mkdirSync(keyDir('eu-west'), { recursive: true, mode: 0o700 });
    const r = runCli(['migrate', '--tenant', TENANT, '--to', 'eu-west'], env());
    expect(r.status, r.stderr).to.equal(1);
    expect(r.stderr)
      .to.include('eu-west')
      .and.include(keyringFile('eu-west'))
      .and.match(/start the region's servers once \(cellcds serve --region eu-west\)/i);
    expect(fs.readdirSync(keyDir('eu-west'))).to.deep.equal([]);
    expect(fs.existsSync(bindingFile('eu-west'))).to.equal(false);
    expect(fs.existsSync(path.join(root, 'eu-west', 'backups', 'migrations'))).to.equal(false);
    expect(await tenantNow()).to.include({ region: 'us-east', status: 'active' });

    // The region's server, started once, makes its keyring and binds its stores to it.
    server = await startServer(
      env({ CELLCDS_REGION: 'eu-west', PORT: String(ports['eu-west']) }),
      (e) => e.includes('Operator token for the admin API'),
    );
    server.child.kill('SIGTERM');
    await new Promise((resolve) => server?.child.once('exit', resolve));
    server = undefined;
    expect(fs.existsSync(keyringFile('eu-west'))).to.equal(true);
    expect(fs.existsSync(bindingFile('eu-west'))).to.equal(true);

    const ok = runCli(['migrate', '--tenant', TENANT, '--to', 'eu-west', '--json'], env());
    expect(ok.status, ok.stderr).to.equal(0);
    expect(JSON.parse(ok.stdout).tenant).to.include({ region: 'eu-west', status: 'active' });
  });

  it('evidence on a region no server opened yet: exit 1, naming the keyring file, no keyring made', () => {
    const r = runCli(
      [
        'evidence',
        '--from',
        '2026-01-01T00:00:00Z',
        '--to',
        '2026-12-31T00:00:00Z',
        '--out',
        path.join(root, 'ev'),
      ],
      env(),
    );
    expect(r.status, r.stderr).to.equal(1);
    expect(r.stderr)
      .to.include(keyringFile('us-east'))
      .and.match(/start the region's servers once/i);
    expect(fs.existsSync(keyDir('us-east'))).to.equal(false);
    expect(fs.existsSync(bindingFile('us-east'))).to.equal(false);
    expect(fs.existsSync(path.join(root, 'ev'))).to.equal(false);
    // Refused before the control plane was opened: the data directory is as it was.
    expect(fs.readdirSync(dataDir())).to.deep.equal([]);
  });

  it('evidence on a region no server opened yet, with a keyring in the folder: exit 1, nothing bound', async () => {
    await createLocalKeyProvider({ keyDir: keyDir('us-east'), region: 'us-east' });
    const r = runCli(
      [
        'evidence',
        '--from',
        '2026-01-01T00:00:00Z',
        '--to',
        '2026-12-31T00:00:00Z',
        '--out',
        path.join(root, 'ev'),
      ],
      env(),
    );
    expect(r.status, r.stderr).to.equal(1);
    expect(r.stderr)
      .to.include("region us-east's stores have no keyring binding yet")
      .and.include(keyringFile('us-east'))
      .and.include('cellcds serve --region us-east');
    expect(fs.existsSync(bindingFile('us-east'))).to.equal(false);
    expect(fs.existsSync(path.join(root, 'ev'))).to.equal(false);
  });
});

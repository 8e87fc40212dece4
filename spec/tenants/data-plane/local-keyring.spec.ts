import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { expect } from 'chai';
import {
  KeyUnavailableError,
  createLocalKeyProvider,
  keyringPath,
} from '../../../tenants/data-plane.ts';
import { asInstance, rejection, tmpDir } from './helpers.ts';

function dek(): crypto.KeyObject {
  return crypto.createSecretKey(crypto.randomBytes(32));
}

function same(a: crypto.KeyObject, b: crypto.KeyObject): boolean {
  return crypto.timingSafeEqual(a.export(), b.export());
}

async function reason(p: Promise<unknown>): Promise<string> {
  return asInstance(await rejection(p), KeyUnavailableError).reason;
}

describe('tenants/ data plane: local keyring provider', () => {
  let dir: string;
  beforeEach(() => {
    dir = tmpDir();
  });
  afterEach(() => {
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('creates <keyDir>/<region>.keyring.json on first start, 0600 in a 0700 folder', async () => {
    const keyDir = path.join(dir, 'keys');
    const kp = await createLocalKeyProvider({ keyDir, region: 'eu-west' });
    const file = keyringPath(keyDir, 'eu-west');
    expect(fs.statSync(file).mode & 0o777).to.equal(0o600);
    expect(fs.statSync(keyDir).mode & 0o777).to.equal(0o700);
    const info = await kp.describe();
    expect(info).to.include({
      kind: 'local-keyring',
      region: 'eu-west',
      location: file,
      primaryKekVersion: 1,
    });
    expect(JSON.stringify(info)).to.not.match(/"k"/);
    expect(await kp.health()).to.deep.equal({ ok: true, kind: 'local-keyring' });
  });

  it('refuses a keyring readable by group or others, and one of another region', async () => {
    const keyDir = path.join(dir, 'keys');
    await createLocalKeyProvider({ keyDir, region: 'eu-west' });
    const file = keyringPath(keyDir, 'eu-west');
    fs.chmodSync(file, 0o644);
    expect(await reason(createLocalKeyProvider({ keyDir, region: 'eu-west' }))).to.equal(
      'provider',
    );
    fs.chmodSync(file, 0o600);
    fs.copyFileSync(file, keyringPath(keyDir, 'us-east'));
    expect(await reason(createLocalKeyProvider({ keyDir, region: 'us-east' }))).to.equal(
      'provider',
    );
  });

  it('wraps and unwraps a DEK bound to tenant and AAD (JWE A256KW + A256GCM)', async () => {
    const kp = await createLocalKeyProvider({ keyDir: dir, region: 'eu-west' });
    await kp.createTenantKey('acme');
    await kp.createTenantKey('other');
    const key = dek();
    const w = await kp.wrapDek('acme', key, 'eu-west|acme|dek|1');
    const header = JSON.parse(
      Buffer.from(w.wrapped.split('.')[0] ?? '', 'base64url').toString('utf8'),
    );
    expect(header).to.include({ alg: 'A256KW', enc: 'A256GCM', kid: 'kek-1' });
    expect(w.wrapped).to.not.include(key.export().toString('base64url'));
    expect(same(await kp.unwrapDek('acme', w.wrapped, 'eu-west|acme|dek|1'), key)).to.equal(true);
    expect(await reason(kp.unwrapDek('other', w.wrapped, 'eu-west|acme|dek|1'))).to.equal(
      'unwrap_failed',
    );
    expect(await reason(kp.unwrapDek('acme', w.wrapped, 'eu-west|acme|dek|2'))).to.equal(
      'unwrap_failed',
    );
    const parts = w.wrapped.split('.');
    const body = Buffer.from(parts[3] ?? '', 'base64url');
    body[0] = (body[0] ?? 0) ^ 1;
    parts[3] = body.toString('base64url');
    expect(await reason(kp.unwrapDek('acme', parts.join('.'), 'eu-west|acme|dek|1'))).to.equal(
      'unwrap_failed',
    );
  });

  it('derives the wrapping key from the tenant key: a forged header naming another tenant still fails', async () => {
    const kp = await createLocalKeyProvider({ keyDir: dir, region: 'eu-west' });
    await kp.createTenantKey('acme');
    await kp.createTenantKey('other');
    const w = await kp.wrapDek('acme', dek(), 'eu-west|other|dek|1');
    // The AAD says "other", but the key that wrapped it is derived from acme's tenant key.
    expect(await reason(kp.unwrapDek('other', w.wrapped, 'eu-west|other|dek|1'))).to.be.oneOf([
      'unwrap_failed',
      'tenant_key_destroyed',
    ]);
  });

  it('crypto-shreds: after destroyTenantKey no wrap of the tenant unwraps, and it is not silently recreated', async () => {
    const kp = await createLocalKeyProvider({ keyDir: dir, region: 'eu-west' });
    await kp.createTenantKey('acme');
    const secret = JSON.parse(fs.readFileSync(keyringPath(dir, 'eu-west'), 'utf8')).tenants.acme.jwk
      .k as string;
    const w = await kp.wrapDek('acme', dek(), 'a');
    expect(await kp.destroyTenantKey('acme')).to.equal(true);
    expect(await kp.hasTenantKey('acme')).to.equal(false);
    expect(fs.readFileSync(keyringPath(dir, 'eu-west'), 'utf8')).to.not.include(secret);
    expect(await reason(kp.unwrapDek('acme', w.wrapped, 'a'))).to.equal('tenant_key_destroyed');
    expect(await reason(kp.createTenantKey('acme'))).to.equal('tenant_key_destroyed');
    expect(await kp.createTenantKey('acme', { recreate: true })).to.equal('created');
    // The new tenant key cannot open wraps made under the destroyed one.
    expect(await reason(kp.unwrapDek('acme', w.wrapped, 'a'))).to.equal('tenant_key_destroyed');
  });

  it('tells a key this keyring never held (tenant_key_missing) from a destroyed one (tombstone)', async () => {
    const shared = await createLocalKeyProvider({ keyDir: dir, region: 'eu-west' });
    await shared.createTenantKey('acme');
    const w = await shared.wrapDek('acme', dek(), 'a');
    // Another replica started on an empty keyring folder: no entry and no tombstone for acme.
    const wrong = await createLocalKeyProvider({
      keyDir: path.join(dir, 'wrong'),
      region: 'eu-west',
    });
    const err = asInstance(
      await rejection(wrong.unwrapDek('acme', w.wrapped, 'a')),
      KeyUnavailableError,
    );
    expect(err.reason).to.equal('tenant_key_missing');
    expect(err.message).to.include('holds no key of tenant acme and never destroyed one');
    expect(err.message).to.include('keyProvider.dir');
    expect(await reason(wrong.wrapDek('acme', dek(), 'a'))).to.equal('tenant_key_missing');
    expect(await reason(wrong.rewrapDek('acme', w.wrapped, 'a'))).to.equal('tenant_key_missing');
    // A tombstone keeps the destroyed reason, for wraps and unwraps alike.
    await shared.destroyTenantKey('acme');
    expect(await reason(shared.unwrapDek('acme', w.wrapped, 'a'))).to.equal('tenant_key_destroyed');
    expect(await reason(shared.wrapDek('acme', dek(), 'a'))).to.equal('tenant_key_destroyed');
    // A tenant new to the keyring still gets its key when it is provisioned.
    expect(await wrong.createTenantKey('acme')).to.equal('created');
  });

  it('rotates the KEK: new wraps use it, old wraps still unwrap, rewrap moves them', async () => {
    const kp = await createLocalKeyProvider({ keyDir: dir, region: 'eu-west' });
    await kp.createTenantKey('acme');
    const key = dek();
    const w1 = await kp.wrapDek('acme', key, 'a');
    expect(await kp.rotateKek()).to.deep.equal({ primary: 2, retiring: [1] });
    const w2 = await kp.rewrapDek('acme', w1.wrapped, 'a');
    expect(w2.kekVersion).to.equal(2);
    expect(same(await kp.unwrapDek('acme', w1.wrapped, 'a'), key)).to.equal(true);
    expect(same(await kp.unwrapDek('acme', w2.wrapped, 'a'), key)).to.equal(true);
    await kp.completeKekRotation();
    expect((await kp.describe()).keks.map((k) => k.status)).to.deep.equal(['retired', 'primary']);
  });

  it('does not lose updates when two processes (providers) write the same keyring', async () => {
    const a = await createLocalKeyProvider({ keyDir: dir, region: 'eu-west' });
    const b = await createLocalKeyProvider({ keyDir: dir, region: 'eu-west' });
    const tenants = Array.from({ length: 12 }, (_, i) => `t${i}`);
    await Promise.all(tenants.map((t, i) => (i % 2 === 0 ? a : b).createTenantKey(t)));
    for (const t of tenants) {
      expect(await a.hasTenantKey(t)).to.equal(true);
      expect(await b.hasTenantKey(t)).to.equal(true);
    }
    const w = await a.wrapDek('t3', dek(), 'x');
    expect(await b.unwrapDek('t3', w.wrapped, 'x')).to.be.instanceOf(crypto.KeyObject);
    expect(
      fs.readdirSync(dir).filter((f) => f.includes('.tmp-') || f.endsWith('.lock')),
    ).to.deep.equal([]);
  });
});

import crypto from 'node:crypto';
import { expect } from 'chai';
import fc from 'fast-check';
import {
  KeyUnavailableError,
  RecordOpenError,
  generateDataKey,
  openRecord,
  recordAad,
  sealRecord,
} from '../../../tenants/data-plane.ts';
import type { RecordAddress, SealingKey } from '../../../tenants/data-plane.ts';
import { asInstance, flipCiphertextByte, rejection } from './helpers.ts';

const A: RecordAddress = { tenant: 'acme', table: 'invocations', recordId: 'inv-1' };
const keyA: SealingKey = { version: 1, key: generateDataKey() };
const keyB: SealingKey = { version: 1, key: generateDataKey() };
const lookup = (k: SealingKey) => (v: number) =>
  v === k.version
    ? Promise.resolve(k.key)
    : Promise.reject(new KeyUnavailableError('dek_destroyed', 'no such version'));

async function openError(
  envelope: string,
  addr: RecordAddress,
  key: SealingKey,
): Promise<RecordOpenError> {
  return asInstance(await rejection(openRecord(envelope, addr, lookup(key))), RecordOpenError);
}

describe('tenants/ data plane: record cipher (AES-256-GCM)', () => {
  it('round-trips any bytes (property) and never repeats an IV', async () => {
    const ivs = new Set<string>();
    await fc.assert(
      fc.asyncProperty(fc.uint8Array({ maxLength: 2048 }), async (bytes) => {
        const env = sealRecord(keyA, A, Buffer.from(bytes));
        const iv = env.split('.')[2] ?? '';
        expect(ivs.has(iv)).to.equal(false);
        ivs.add(iv);
        const back = await openRecord(env, A, lookup(keyA));
        return back.equals(Buffer.from(bytes));
      }),
    );
  });

  it('names its key version, a 96-bit IV and a 128-bit tag in the envelope', () => {
    const env = sealRecord({ version: 7, key: keyA.key }, A, Buffer.from('x'));
    const [prefix, version, iv, , tag] = env.split('.');
    expect(prefix).to.equal('ccds1');
    expect(version).to.equal('7');
    expect(Buffer.from(iv ?? '', 'base64url')).to.have.length(12);
    expect(Buffer.from(tag ?? '', 'base64url')).to.have.length(16);
  });

  it('fails loudly on any flipped byte of IV, ciphertext or tag', async () => {
    const env = sealRecord(keyA, A, Buffer.from('{"patient":"PHI-MARKER"}'));
    for (const segment of [2, 3, 4]) {
      for (const index of [0, 5, 11]) {
        const err = await openError(flipCiphertextByte(env, segment, index), A, keyA);
        expect(err.reason).to.equal('authentication_failed');
      }
    }
  });

  const moved: Array<[string, RecordAddress]> = [
    ['another tenant', { ...A, tenant: 'other' }],
    ['another table', { ...A, table: 'feedback' }],
    ['another record', { ...A, recordId: 'inv-2' }],
  ];
  for (const [name, addr] of moved) {
    it(`fails to open under ${name} (AAD binds tenant|table|recordId)`, async () => {
      const env = sealRecord(keyA, A, Buffer.from('secret'));
      expect((await openError(env, addr, keyA)).reason).to.equal('authentication_failed');
    });
  }

  it("fails to open with another tenant's DEK", async () => {
    const env = sealRecord(keyA, A, Buffer.from('secret'));
    expect((await openError(env, A, keyB)).reason).to.equal('authentication_failed');
  });

  it('fails with key_unavailable when the version is destroyed, never returning null', async () => {
    const env = sealRecord({ version: 2, key: keyA.key }, A, Buffer.from('secret'));
    const err = await openError(env, A, keyA);
    expect(err.reason).to.equal('key_unavailable');
    expect(err.cause).to.be.instanceOf(KeyUnavailableError);
  });

  const malformed = [
    '',
    'ccds1',
    'ccds2.1.a.b.c',
    'ccds1.0.AAAA.AAAA.AAAA',
    'ccds1.1.!!.AA.AA',
    'ccds1.1.AAAA.AAAA.AAAA',
  ];
  for (const env of malformed) {
    it(`refuses a malformed envelope ${JSON.stringify(env)}`, async () => {
      expect((await openError(env, A, keyA)).reason).to.equal('malformed');
    });
  }

  it('refuses address parts that would make the AAD ambiguous', () => {
    expect(() => recordAad({ tenant: 'a|b', table: 't', recordId: 'r' })).to.throw(TypeError);
    expect(() => recordAad({ tenant: 'a', table: 't', recordId: '' })).to.throw(TypeError);
  });

  it('keeps error messages free of plaintext and key material', async () => {
    const env = sealRecord(keyA, A, Buffer.from('PHI-MARKER-xyz'));
    const err = await openError(flipCiphertextByte(env), A, keyA);
    expect(err.message).to.not.include('PHI-MARKER');
    expect(err.message).to.not.include(keyA.key.export().toString('base64url'));
    expect(crypto.getCiphers()).to.include('aes-256-gcm');
  });
});

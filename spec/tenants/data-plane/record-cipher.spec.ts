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
  sealRecordAs,
  sealRecordBinary,
} from '../../../tenants/data-plane.ts';
import type { Envelope, RecordAddress, SealingKey } from '../../../tenants/data-plane.ts';
import { asInstance, flipCiphertextByte, rejection } from './helpers.ts';

const A: RecordAddress = { tenant: 'acme', table: 'invocations', recordId: 'inv-1' };
const keyA: SealingKey = { version: 1, key: generateDataKey() };
const keyB: SealingKey = { version: 1, key: generateDataKey() };
const lookup = (k: SealingKey) => (v: number) =>
  v === k.version
    ? Promise.resolve(k.key)
    : Promise.reject(new KeyUnavailableError('dek_destroyed', 'no such version'));

async function openError(
  envelope: Envelope,
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

  it('fails loudly on any flipped byte of IV, ciphertext or tag (text and binary forms)', async () => {
    for (const seal of [sealRecord, sealRecordBinary]) {
      const env = seal(keyA, A, Buffer.from('{"patient":"PHI-MARKER"}'));
      for (const segment of [2, 3, 4]) {
        for (const index of [0, 5, 11]) {
          const err = await openError(flipCiphertextByte(env, segment, index), A, keyA);
          expect(err.reason).to.equal('authentication_failed');
        }
      }
    }
  });

  const moved: Array<[string, RecordAddress]> = [
    ['another tenant', { ...A, tenant: 'other' }],
    ['another table', { ...A, table: 'feedback' }],
    ['another record', { ...A, recordId: 'inv-2' }],
  ];
  for (const [name, addr] of moved) {
    it(`fails to open under ${name} (AAD binds tenant|table|recordId), in both forms`, async () => {
      for (const seal of [sealRecord, sealRecordBinary]) {
        const env = seal(keyA, A, Buffer.from('secret'));
        expect((await openError(env, addr, keyA)).reason).to.equal('authentication_failed');
      }
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

  describe('binary form (what SQLite stores keep)', () => {
    it('round-trips any bytes (property), is 37 bytes longer than the plaintext', async () => {
      await fc.assert(
        fc.asyncProperty(fc.uint8Array({ maxLength: 2048 }), async (bytes) => {
          const env = sealRecordBinary(keyA, A, Buffer.from(bytes));
          expect(env.length).to.equal(bytes.length + 5 + 4 + 12 + 16);
          const back = await openRecord(env, A, lookup(keyA));
          return back.equals(Buffer.from(bytes));
        }),
      );
    });

    it('starts with "ccds" 0x02 and names its key version (uint32, big-endian)', () => {
      const env = sealRecordBinary({ version: 258, key: keyA.key }, A, Buffer.from('x'));
      expect(env.subarray(0, 5)).to.deep.equal(Buffer.from([0x63, 0x63, 0x64, 0x73, 0x02]));
      expect(env.readUInt32BE(5)).to.equal(258);
    });

    it('never repeats an IV', () => {
      const ivs = new Set<string>();
      for (let i = 0; i < 2000; i++) {
        ivs.add(sealRecordBinary(keyA, A, Buffer.from('x')).subarray(9, 21).toString('hex'));
      }
      expect(ivs.size).to.equal(2000);
    });

    it('a changed version field points at another key: key_unavailable or authentication_failed', async () => {
      const env = sealRecordBinary(keyA, A, Buffer.from('secret'));
      env.writeUInt32BE(2, 5);
      expect((await openError(env, A, keyA)).reason).to.equal('key_unavailable');
      const other = sealRecordBinary({ version: 2, key: keyB.key }, A, Buffer.from('secret'));
      other.writeUInt32BE(1, 5);
      expect((await openError(other, A, keyA)).reason).to.equal('authentication_failed');
    });

    const good = () => sealRecordBinary(keyA, A, Buffer.from('secret'));
    const broken: Array<[string, () => Uint8Array]> = [
      ['empty', () => new Uint8Array(0)],
      ['shorter than header and tag', () => good().subarray(0, 36)],
      [
        'another format number',
        () => Buffer.concat([Buffer.from('ccds'), Buffer.from([3]), good().subarray(5)]),
      ],
      ['the text form as bytes', () => Buffer.from(sealRecord(keyA, A, Buffer.from('secret')))],
      [
        'version 0',
        () => {
          const b = good();
          b.writeUInt32BE(0, 5);
          return b;
        },
      ],
      [
        'version above 999999999',
        () => {
          const b = good();
          b.writeUInt32BE(1_000_000_000, 5);
          return b;
        },
      ],
    ];
    for (const [name, make] of broken) {
      it(`refuses a malformed binary envelope: ${name}`, async () => {
        expect((await openError(make(), A, keyA)).reason).to.equal('malformed');
      });
    }

    it('opens a Uint8Array view into a larger buffer (what a driver may return)', async () => {
      const env = sealRecordBinary(keyA, A, Buffer.from('secret'));
      const big = new Uint8Array(env.length + 10);
      big.set(env, 7);
      const view = big.subarray(7, 7 + env.length);
      expect((await openRecord(view, A, lookup(keyA))).toString()).to.equal('secret');
    });

    it('sealRecordAs seals in the form asked for; both forms open with the same key', async () => {
      const text = sealRecordAs('text', keyA, A, Buffer.from('same'));
      const binary = sealRecordAs('binary', keyA, A, Buffer.from('same'));
      expect(typeof text).to.equal('string');
      expect(Buffer.isBuffer(binary)).to.equal(true);
      for (const env of [text, binary]) {
        expect((await openRecord(env, A, lookup(keyA))).toString()).to.equal('same');
      }
    });

    it('refuses to seal under a version the envelope cannot name', () => {
      for (const version of [0, -1, 1.5, 1_000_000_000]) {
        expect(() => sealRecordBinary({ version, key: keyA.key }, A, Buffer.from('x'))).to.throw(
          TypeError,
        );
      }
    });
  });
});

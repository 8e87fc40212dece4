/**
 * Loading the official CDS Hooks examples copied into spec/fixtures/cds-hooks-spec/.
 */
import fs from 'node:fs';
import path from 'node:path';

export const SPEC_DIR = path.join(import.meta.dirname, '..', 'fixtures', 'cds-hooks-spec');

/** Parsed example JSON; specs index into it freely (the shapes are the spec's, not ours). */
// eslint-disable-next-line @typescript-eslint/no-explicit-any -- arbitrary fixture JSON
export type Json = Record<string, any>;

/** A fresh parse of one example, e.g. `loadExample('2.0/patient-view-request.json')`. */
export function loadExample(file: string): Json {
  return JSON.parse(fs.readFileSync(path.join(SPEC_DIR, file), 'utf8')) as Json;
}

/** A full request body around a hook-library `{"context": ...}` example. */
export function requestAround(file: string, hook: string): Json {
  return {
    hook,
    hookInstance: 'd1577c69-dfbe-44ad-ba6d-3e05e953b2ea',
    context: loadExample(file)['context'],
  };
}

/** The URL a fetch() call was given, whatever its form. */
export function urlOf(input: string | URL | Request): string {
  if (typeof input === 'string') {
    return input;
  }
  return input instanceof URL ? input.href : input.url;
}

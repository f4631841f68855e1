#!/usr/bin/env node
// Rewrites a .cu kernel file into C++ for the CUDA emulator (cuda/emu/emu_runtime.h), keeping line numbers:
//   kernel<<<grid, block[, shared[, stream]]>>>(args)  ->  ::tfew::emu::launch("kernel", grid, block, shared, stream, kernel, args)
//   extern __shared__ [__align__(n)] T name[];          ->  T* name = reinterpret_cast<T*>(<the block's dynamic shared memory>);
// and puts the emulator's device prelude (cuda/emu/emu_device.h) first.
//   node scripts/emu-translate.js IN.cu OUT.cc
'use strict';
const fs = require('fs');
const path = require('path');

function splitTopLevel(text) {
  const parts = [];
  let depth = 0;
  let start = 0;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (c === '(' || c === '[' || c === '{') depth++;
    else if (c === ')' || c === ']' || c === '}') depth--;
    else if (c === ',' && depth === 0) {
      parts.push(text.slice(start, i).trim());
      start = i + 1;
    }
  }
  const last = text.slice(start).trim();
  if (last) parts.push(last);
  return parts;
}

// The kernel expression that ends at `end` (exclusive): an identifier, maybe qualified, maybe with <...>.
function kernelStart(src, end) {
  let i = end;
  while (i > 0 && /\s/.test(src[i - 1])) i--;
  if (src[i - 1] === '>') {
    let depth = 0;
    do {
      i--;
      if (src[i] === '>') depth++;
      else if (src[i] === '<') depth--;
    } while (depth > 0 && i > 0);
  }
  while (i > 0 && /[\w:]/.test(src[i - 1])) i--;
  return i;
}

function matchingParen(src, open) {
  let depth = 0;
  for (let i = open; i < src.length; i++) {
    if (src[i] === '(') depth++;
    else if (src[i] === ')' && --depth === 0) return i;
  }
  throw new Error(`unbalanced parentheses after offset ${open}`);
}

function translate(src, file) {
  src = src.replace(/extern\s+__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s+)?([\w:]+(?:\s+[\w:]+)*?)\s+(\w+)\s*\[\s*\]\s*;/g,
    (_, type, name) => `${type}* ${name} = reinterpret_cast<${type}*>(::tfew::emu::position().dynamic_shared);`);
  let out = '';
  let pos = 0;
  for (;;) {
    const open = src.indexOf('<<<', pos);
    if (open < 0) break;
    const close = src.indexOf('>>>', open);
    const paren = src.indexOf('(', close);
    if (close < 0 || paren < 0 || src.slice(close + 3, paren).trim() !== '') {
      throw new Error(`${file}: cannot parse the launch at offset ${open}`);
    }
    const start = kernelStart(src, open);
    const kernel = src.slice(start, open).trim();
    const config = splitTopLevel(src.slice(open + 3, close));
    if (config.length < 2 || config.length > 4) throw new Error(`${file}: launch of ${kernel} has ${config.length} configuration values`);
    while (config.length < 4) config.push(config.length === 2 ? '0' : 'cudaStream_t{nullptr}');
    const end = matchingParen(src, paren);
    const args = src.slice(paren + 1, end);
    const name = kernel.replace(/\s+/g, '');
    out += src.slice(pos, start);
    out += `::tfew::emu::launch(${JSON.stringify(name)}, ${config.join(', ')}, ${kernel}${args.trim() ? ', ' : ''}${args})`;
    pos = end + 1;
  }
  out += src.slice(pos);
  return `#include "emu/emu_device.h"\n#line 1 ${JSON.stringify(file)}\n${out}`;
}

if (require.main === module) {
  const [input, output] = process.argv.slice(2);
  if (!input || !output) {
    console.error('usage: node scripts/emu-translate.js IN.cu OUT.cc');
    process.exit(2);
  }
  const text = translate(fs.readFileSync(input, 'utf8'), path.resolve(input));
  fs.mkdirSync(path.dirname(output), { recursive: true });
  // Rewrite only on change, so the build does not recompile untouched kernels.
  if (!fs.existsSync(output) || fs.readFileSync(output, 'utf8') !== text) fs.writeFileSync(output, text);
}

module.exports = { translate };

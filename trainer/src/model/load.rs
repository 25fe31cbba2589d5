//! Reading a checkpoint's safetensors files straight into the layout the model holds: each
//! tensor is read with positional reads split over the thread pool and decoded to f32, the
//! projections transposed in the same pass, so no file or tensor is copied whole on the way
//! (`candle_core::safetensors::load` read each file into memory, copied every tensor out of
//! it, then converted and transposed each in further copies).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::error::{checkpoint, Result};

/// Bytes per read task.
const READ_CHUNK: usize = 4 << 20;
/// Elements per decode task.
const DECODE_CHUNK: usize = 1 << 16;

/// Where one tensor's bytes lie.
struct Entry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    /// From the start of the file.
    offset: u64,
}

/// The tensors of a checkpoint's safetensors files, read one at a time on request.
pub(super) struct Checkpoint {
    files: Vec<(PathBuf, File)>,
    entries: HashMap<String, Entry>,
    /// The raw bytes of a tensor that is decoded or transposed; reused, so its pages are
    /// faulted in once rather than per tensor.
    scratch: Vec<u32>,
}

#[derive(serde::Deserialize)]
struct Header {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

impl Checkpoint {
    /// Opens the files and reads their headers.
    pub(super) fn open(paths: Vec<PathBuf>) -> Result<Self> {
        let mut ckpt = Checkpoint {
            files: Vec::with_capacity(paths.len()),
            entries: HashMap::new(),
            scratch: Vec::new(),
        };
        for path in paths {
            let file = File::open(&path)
                .map_err(|e| checkpoint(format!("cannot read {}: {e}", path.display())))?;
            ckpt.index(ckpt.files.len(), &file)
                .map_err(|e| checkpoint(format!("cannot read {}: {e}", path.display())))?;
            ckpt.files.push((path, file));
        }
        Ok(ckpt)
    }

    fn index(&mut self, file: usize, f: &File) -> Result<()> {
        let mut len = [0u8; 8];
        f.read_exact_at(&mut len, 0)?;
        let len = u64::from_le_bytes(len);
        let size = f.metadata()?.len();
        if len > size.saturating_sub(8) {
            return Err(checkpoint(format!(
                "header of {len} bytes in a {size}-byte file"
            )));
        }
        let mut header = vec![0u8; len as usize];
        f.read_exact_at(&mut header, 8)?;
        let doc: HashMap<String, serde_json::Value> = serde_json::from_slice(&header)?;
        for (name, v) in doc {
            if name == "__metadata__" {
                continue;
            }
            let h: Header = serde_json::from_value(v)?;
            let dtype = h
                .dtype
                .to_lowercase()
                .parse::<DType>()
                .map_err(|e| checkpoint(format!("{name}: {e}")))?;
            let bytes = h.shape.iter().product::<usize>() * dtype.size_in_bytes();
            let [start, end] = h.data_offsets;
            if end.checked_sub(start) != Some(bytes as u64) || 8 + len + end > size {
                return Err(checkpoint(format!(
                    "{name}: bad data_offsets {start}..{end}"
                )));
            }
            let offset = 8 + len + start;
            let e = Entry {
                file,
                dtype,
                shape: h.shape,
                offset,
            };
            self.entries.insert(name, e);
        }
        Ok(())
    }

    /// Where tensor `name` lies (file, stored dtype, offset), checked against the `shape`
    /// the config implies.
    fn locate(&self, name: &str, shape: &[usize], transpose: bool) -> Result<(usize, DType, u64)> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| checkpoint(format!("checkpoint has no tensor {name}")))?;
        if e.shape != shape || (transpose && shape.len() != 2) {
            return Err(checkpoint(format!(
                "{name} has shape {:?}, the config implies {shape:?}",
                e.shape
            )));
        }
        Ok((e.file, e.dtype, e.offset))
    }

    /// `nbytes` from `offset` of file `file`, read into the scratch buffer.
    fn read_scratch(&mut self, file: usize, offset: u64, nbytes: usize) -> Result<&[u32]> {
        let nwords = nbytes.div_ceil(4);
        if self.scratch.len() < nwords {
            self.scratch.resize(nwords, 0);
        }
        let (path, f) = &self.files[file];
        let bytes = &mut bytemuck::cast_slice_mut(&mut self.scratch[..nwords])[..nbytes];
        read_par(f, offset, bytes).map_err(|e| read_error(path, e))?;
        Ok(&self.scratch[..nwords])
    }

    /// The tensor `name`, which must have `shape`, as stored (its file's dtype), on the CPU.
    pub(super) fn read_stored(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let (file, dtype, offset) = self.locate(name, shape, false)?;
        let nbytes = shape.iter().product::<usize>() * dtype.size_in_bytes();
        let words = self.read_scratch(file, offset, nbytes)?;
        let raw = &bytemuck::cast_slice::<u32, u8>(words)[..nbytes];
        Ok(Tensor::from_raw_buffer(raw, dtype, shape, &Device::Cpu)?)
    }

    /// The tensor `name`, which must have `shape`, in f32 on the CPU; with `transpose`, a
    /// 2-D tensor's transpose, contiguous. Values are exactly candle's `to_dtype(F32)`.
    pub(super) fn read(&mut self, name: &str, shape: &[usize], transpose: bool) -> Result<Tensor> {
        let (file, dtype, offset) = self.locate(name, shape, transpose)?;
        let n: usize = shape.iter().product();
        if dtype == DType::F32 && !transpose {
            let (path, f) = &self.files[file];
            let mut out = vec![0f32; n];
            read_par(f, offset, bytemuck::cast_slice_mut(&mut out))
                .map_err(|e| read_error(path, e))?;
            return Ok(Tensor::from_vec(out, shape, &Device::Cpu)?);
        }
        let nbytes = n * dtype.size_in_bytes();
        let words = self.read_scratch(file, offset, nbytes)?;
        let halves = || &bytemuck::cast_slice::<u32, u16>(words)[..n];
        let t = match dtype {
            DType::F32 => transpose_with(bytemuck::cast_slice::<u32, f32>(words), shape, |v| v),
            DType::BF16 => decode(halves(), shape, transpose, |v| {
                half::bf16::from_bits(v).to_f32()
            }),
            DType::F16 => decode(halves(), shape, transpose, |v| {
                half::f16::from_bits(v).to_f32()
            }),
            dtype => {
                let raw = &bytemuck::cast_slice::<u32, u8>(words)[..nbytes];
                let x = Tensor::from_raw_buffer(raw, dtype, shape, &Device::Cpu)?;
                let x = x.to_dtype(DType::F32)?;
                if !transpose {
                    return Ok(x);
                }
                transpose_with(&x.flatten_all()?.to_vec1::<f32>()?, shape, |v| v)
            }
        };
        let dims = if transpose {
            vec![shape[1], shape[0]]
        } else {
            shape.to_vec()
        };
        Ok(Tensor::from_vec(t, dims, &Device::Cpu)?)
    }
}

fn read_error(path: &std::path::Path, e: std::io::Error) -> crate::error::Error {
    checkpoint(format!("cannot read {}: {e}", path.display()))
}

/// Fills `buf` from `file` at `offset`, in chunks read in parallel.
fn read_par(file: &File, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
    buf.par_chunks_mut(READ_CHUNK)
        .enumerate()
        .try_for_each(|(i, c)| file.read_exact_at(c, offset + (i * READ_CHUNK) as u64))
}

/// `src` decoded element by element with `f`, transposed when `transpose` (2-D).
fn decode<T: Copy + Sync>(
    src: &[T],
    shape: &[usize],
    transpose: bool,
    f: impl Fn(T) -> f32 + Sync,
) -> Vec<f32> {
    if transpose {
        return transpose_with(src, shape, f);
    }
    let mut out = vec![0f32; src.len()];
    out.par_chunks_mut(DECODE_CHUNK)
        .zip(src.par_chunks(DECODE_CHUNK))
        .for_each(|(o, s)| o.iter_mut().zip(s).for_each(|(o, s)| *o = f(*s)));
    out
}

/// The transpose of the row-major `(rows, cols)` matrix `src`, each element mapped by `f`:
/// TILE output rows (input columns) per task, filled TILE input rows at a time so the tile
/// read stays in cache while each output row is written in a contiguous run (writing
/// contiguously into the fresh output halved the time of writing down its columns).
pub(super) fn transpose_with<T: Copy + Sync>(
    src: &[T],
    shape: &[usize],
    f: impl Fn(T) -> f32 + Sync,
) -> Vec<f32> {
    const TILE: usize = 64;
    let (rows, cols) = (shape[0], shape[1]);
    let mut out = vec![0f32; src.len()];
    if rows == 0 {
        return out;
    }
    out.par_chunks_mut(TILE * rows)
        .enumerate()
        .for_each(|(block, o)| {
            let c0 = block * TILE;
            for r0 in (0..rows).step_by(TILE) {
                let r1 = (r0 + TILE).min(rows);
                for (j, row) in o.chunks_exact_mut(rows).enumerate() {
                    for (k, d) in row[r0..r1].iter_mut().enumerate() {
                        *d = f(src[(r0 + k) * cols + c0 + j]);
                    }
                }
            }
        });
    out
}

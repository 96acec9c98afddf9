//! Reference cases (see CASES.md): one `.safetensors` file holding an op's inputs
//! (`in.NAME`), the outputs a trusted reference produced (`out.NAME`), and metadata (`op`,
//! `params`, optional `rtol`/`atol`/`source`). This module reads a case, runs it on a
//! device, and compares with the op's comparator.

use crate::attention::{
    self, AttentionGrads, AttentionInputs, AttentionParams, AttentionShape, Bias, CuSeqlens,
};
use crate::element::{DType, Element};
use crate::error::{Error, Result};
use crate::ridge;
use crate::scan::gla::{GlaGrads, GlaInputs, GlaParams, GlaShape, gla, gla_backward};
use crate::scan::selective::{
    SelectiveGrads, SelectiveInputs, SelectiveParams, SelectiveShape, selective, selective_backward,
};
use crate::scan::{self, Numbers, ScanParams, ScanShape};
use half::{bf16, f16};
use safetensors::{Dtype as StDtype, SafeTensors};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

mod topk_ops;

/// Every op of the contract in CASES.md; those not in [`IMPLEMENTED_OPS`] fail with
/// `op not implemented`.
pub const CONTRACT_OPS: &[&str] = &[
    "attention.forward",
    "attention.backward",
    "attention.top_keys",
    "scan.linear",
    "scan.linear_backward",
    "scan.linear_complex",
    "scan.selective",
    "scan.selective_backward",
    "scan.gla",
    "scan.gla_backward",
    "topk.rows",
    "sae.encode",
    "sae.encode_batch_topk",
    "sae.encode_jumprelu",
    "sae.decode",
    "sae.backward",
    "sae.encode_mp",
    "codebook.nearest",
    "ridge.solve_batched",
    "ridge.cv",
    "ridge.banded_cv",
    "ridge.split_scores",
    "ridge.score",
];

/// Ops this crate adds beside the contract (proposed for CASES.md): the backward of the
/// complex scan, with PyTorch's convention for complex gradients.
pub const EXTENSION_OPS: &[&str] = &["scan.linear_complex_backward"];

/// Ops whose CUDA path takes f32, f16 and bf16 but not f64 (their F64 cases run on the CPU
/// only; on CUDA they are `Unsupported`).
pub const CUDA_NO_F64_OPS: &[&str] = &[
    "topk.rows",
    "sae.encode",
    "sae.encode_batch_topk",
    "sae.encode_jumprelu",
    "sae.decode",
    "sae.backward",
    "sae.encode_mp",
    "codebook.nearest",
];

/// The ops this build can run.
pub const IMPLEMENTED_OPS: &[&str] = &[
    "attention.forward",
    "attention.backward",
    "attention.top_keys",
    "scan.linear",
    "scan.linear_backward",
    "scan.linear_complex",
    "scan.linear_complex_backward",
    "scan.selective",
    "scan.selective_backward",
    "scan.gla",
    "scan.gla_backward",
    "ridge.cv",
    "ridge.banded_cv",
    "ridge.split_scores",
    "ridge.solve_batched",
    "ridge.score",
    "topk.rows",
    "sae.encode",
    "sae.encode_batch_topk",
    "sae.encode_jumprelu",
    "sae.decode",
    "sae.backward",
    "sae.encode_mp",
    "codebook.nearest",
];

/// A host tensor's data.
#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    /// The tensor's values as f32.
    F32(Vec<f32>),
    /// The tensor's values as f64.
    F64(Vec<f64>),
    /// The tensor's values as f16.
    F16(Vec<f16>),
    /// The tensor's values as bf16.
    BF16(Vec<bf16>),
    /// An index tensor's values (I64 in a case file is narrowed to this on reading).
    I32(Vec<i32>),
}

/// A host tensor: row-major, contiguous.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    /// The dimensions, outermost first.
    pub shape: Vec<usize>,
    /// The values in row-major order, tagged with their dtype; as many as `shape`'s product.
    pub data: Data,
}

/// Element types a case tensor can hold as floats.
pub trait CaseElement: Element {
    /// The values in this type's [`Data`] variant.
    fn wrap(values: Vec<Self>) -> Data;
    /// The values, when `data` holds this type; `None` for another dtype.
    fn unwrap(data: &Data) -> Option<&[Self]>;
}

macro_rules! case_element {
    ($t:ty, $variant:ident) => {
        impl CaseElement for $t {
            fn wrap(values: Vec<Self>) -> Data {
                Data::$variant(values)
            }
            fn unwrap(data: &Data) -> Option<&[Self]> {
                match data {
                    Data::$variant(v) => Some(v),
                    _ => None,
                }
            }
        }
    };
}
case_element!(f32, F32);
case_element!(f64, F64);
case_element!(f16, F16);
case_element!(bf16, BF16);

impl Tensor {
    /// A float tensor of `shape` holding `values` (row-major; the length is not checked
    /// against the shape).
    pub fn new<E: CaseElement>(shape: Vec<usize>, values: Vec<E>) -> Self {
        Self {
            shape,
            data: E::wrap(values),
        }
    }

    /// The number of values.
    pub fn len(&self) -> usize {
        match &self.data {
            Data::F32(v) => v.len(),
            Data::F64(v) => v.len(),
            Data::F16(v) => v.len(),
            Data::BF16(v) => v.len(),
            Data::I32(v) => v.len(),
        }
    }

    /// Whether the tensor holds no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The float dtype, or `None` for an index tensor.
    pub fn dtype(&self) -> Option<DType> {
        match &self.data {
            Data::F32(_) => Some(DType::F32),
            Data::F64(_) => Some(DType::F64),
            Data::F16(_) => Some(DType::F16),
            Data::BF16(_) => Some(DType::BF16),
            Data::I32(_) => None,
        }
    }

    /// The dtype's name: `"f32"`, `"f64"`, `"f16"`, `"bf16"`, or `"i32"` for an index tensor.
    pub fn dtype_name(&self) -> &'static str {
        self.dtype().map_or("i32", DType::name)
    }

    /// Every value widened to f64.
    pub fn to_f64(&self) -> Vec<f64> {
        match &self.data {
            Data::F32(v) => v.iter().map(|x| *x as f64).collect(),
            Data::F64(v) => v.clone(),
            Data::F16(v) => v.iter().map(|x| x.to_f64()).collect(),
            Data::BF16(v) => v.iter().map(|x| x.to_f64()).collect(),
            Data::I32(v) => v.iter().map(|x| *x as f64).collect(),
        }
    }

    fn bytes(&self) -> Cow<'_, [u8]> {
        match &self.data {
            Data::F32(v) => Cow::Borrowed(bytemuck::cast_slice(v)),
            Data::F64(v) => Cow::Borrowed(bytemuck::cast_slice(v)),
            Data::F16(v) => Cow::Borrowed(bytemuck::cast_slice(v)),
            Data::BF16(v) => Cow::Borrowed(bytemuck::cast_slice(v)),
            Data::I32(v) => Cow::Borrowed(bytemuck::cast_slice(v)),
        }
    }

    fn st_dtype(&self) -> StDtype {
        match &self.data {
            Data::F32(_) => StDtype::F32,
            Data::F64(_) => StDtype::F64,
            Data::F16(_) => StDtype::F16,
            Data::BF16(_) => StDtype::BF16,
            Data::I32(_) => StDtype::I32,
        }
    }
}

impl safetensors::View for &Tensor {
    fn dtype(&self) -> StDtype {
        self.st_dtype()
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        self.bytes()
    }
    fn data_len(&self) -> usize {
        self.bytes().len()
    }
}

/// One reference case.
#[derive(Clone, Debug)]
pub struct Case {
    /// The case's name in messages: its file name when loaded with [`Case::load`].
    pub name: String,
    /// The op to call, from the metadata's `op`, e.g. `attention.forward`.
    pub op: String,
    /// The op's parameters, from the metadata's `params` JSON object (empty when absent;
    /// missing keys take the op's defaults).
    pub params: serde_json::Map<String, serde_json::Value>,
    /// The metadata's `rtol`, overriding the dtype's default; `None` when absent.
    pub rtol: Option<f64>,
    /// The metadata's `atol`, overriding the dtype's default; `None` when absent.
    pub atol: Option<f64>,
    /// The metadata's `source`: free text naming the reference that made the outputs.
    pub source: Option<String>,
    /// The inputs, from the `in.NAME` tensors, keyed by NAME.
    pub inputs: BTreeMap<String, Tensor>,
    /// The reference's expected outputs, from the `out.NAME` tensors, keyed by NAME.
    pub outputs: BTreeMap<String, Tensor>,
}

fn case_err(name: &str, what: impl std::fmt::Display) -> Error {
    Error::Case(format!("{name}: {what}"))
}

impl Case {
    /// Reads the case file at `path`, named by its file name; `Err(Io)` when it cannot be
    /// read, otherwise as [`Case::from_bytes`].
    pub fn load(path: &Path) -> Result<Case> {
        let bytes =
            std::fs::read(path).map_err(|e| Error::Io(format!("{}: {e}", path.display())))?;
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        Case::from_bytes(&name, &bytes)
    }

    /// Parses a case from a safetensors file's bytes, naming it `name`. `Err(Case)` when the
    /// file is not safetensors, the metadata has no `op`, `params` is not a JSON object,
    /// `rtol`/`atol` is not a number, a tensor is neither `in.` nor `out.`, a dtype is not
    /// one of F32, F64, F16, BF16, I32, I64, or an I64 value does not fit in i32.
    pub fn from_bytes(name: &str, bytes: &[u8]) -> Result<Case> {
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| case_err(name, e))?;
        let meta: HashMap<String, String> = header.metadata().clone().unwrap_or_default();
        let op = meta
            .get("op")
            .cloned()
            .ok_or_else(|| case_err(name, "metadata has no `op`"))?;
        let params = match meta.get("params") {
            None => serde_json::Map::new(),
            Some(text) => match serde_json::from_str::<serde_json::Value>(text) {
                Ok(serde_json::Value::Object(map)) => map,
                Ok(_) => return Err(case_err(name, "`params` is not a JSON object")),
                Err(e) => return Err(case_err(name, format!("`params` is not JSON: {e}"))),
            },
        };
        let tolerance = |key: &str| -> Result<Option<f64>> {
            meta.get(key)
                .map(|v| {
                    v.trim()
                        .parse::<f64>()
                        .map_err(|_| case_err(name, format!("`{key}` is not a number: {v:?}")))
                })
                .transpose()
        };
        let (rtol, atol) = (tolerance("rtol")?, tolerance("atol")?);
        let tensors = SafeTensors::deserialize(bytes).map_err(|e| case_err(name, e))?;
        let mut inputs = BTreeMap::new();
        let mut outputs = BTreeMap::new();
        for (key, view) in tensors.tensors() {
            let tensor = read_tensor(name, &key, view.dtype(), view.shape(), view.data())?;
            if let Some(n) = key.strip_prefix("in.") {
                inputs.insert(n.to_string(), tensor);
            } else if let Some(n) = key.strip_prefix("out.") {
                outputs.insert(n.to_string(), tensor);
            } else {
                return Err(case_err(
                    name,
                    format!("tensor `{key}` is neither `in.` nor `out.`"),
                ));
            }
        }
        Ok(Case {
            name: name.to_string(),
            op,
            params,
            rtol,
            atol,
            source: meta.get("source").cloned(),
            inputs,
            outputs,
        })
    }

    fn input(&self, name: &str) -> Result<&Tensor> {
        self.inputs
            .get(name)
            .ok_or_else(|| case_err(&self.name, format!("missing input `in.{name}`")))
    }

    /// `Err` if the case has an input the op does not take.
    fn only_inputs(&self, allowed: &[&str]) -> Result<()> {
        match self.inputs.keys().find(|k| !allowed.contains(&k.as_str())) {
            Some(k) => Err(case_err(
                &self.name,
                format!("unknown input `in.{k}` for {}", self.op),
            )),
            None => Ok(()),
        }
    }

    /// The dtype the case computes in, which sets its default tolerance: the least precise
    /// float input (a bf16 `u` beside an f32 `A` in a selective scan is a bf16 case).
    pub fn dtype(&self) -> Option<DType> {
        let precision = |d: &DType| match d {
            DType::F16 | DType::BF16 => 0,
            DType::F32 => 1,
            DType::F64 => 2,
        };
        self.inputs
            .values()
            .filter_map(Tensor::dtype)
            .min_by_key(precision)
    }
}

fn read_tensor(
    case: &str,
    key: &str,
    dtype: StDtype,
    shape: &[usize],
    bytes: &[u8],
) -> Result<Tensor> {
    let data = match dtype {
        StDtype::F32 => Data::F32(bytemuck::pod_collect_to_vec(bytes)),
        StDtype::F64 => Data::F64(bytemuck::pod_collect_to_vec(bytes)),
        StDtype::F16 => Data::F16(bytemuck::pod_collect_to_vec(bytes)),
        StDtype::BF16 => Data::BF16(bytemuck::pod_collect_to_vec(bytes)),
        StDtype::I32 => Data::I32(bytemuck::pod_collect_to_vec(bytes)),
        StDtype::I64 => {
            let wide: Vec<i64> = bytemuck::pod_collect_to_vec(bytes);
            let narrow = wide
                .iter()
                .map(|&v| {
                    i32::try_from(v).map_err(|_| {
                        case_err(case, format!("`{key}`: index {v} does not fit in i32"))
                    })
                })
                .collect::<Result<Vec<i32>>>()?;
            Data::I32(narrow)
        }
        other => {
            return Err(case_err(
                case,
                format!("`{key}` has unsupported dtype {other:?}"),
            ));
        }
    };
    Ok(Tensor {
        shape: shape.to_vec(),
        data,
    })
}

/// Reads an op's `params`, rejecting unknown keys.
struct Params<'a> {
    case: &'a str,
    map: &'a serde_json::Map<String, serde_json::Value>,
    known: Vec<&'static str>,
}

impl<'a> Params<'a> {
    fn new(case: &'a Case) -> Self {
        Self {
            case: &case.name,
            map: &case.params,
            known: Vec::new(),
        }
    }

    fn bool(&mut self, key: &'static str, default: bool) -> Result<bool> {
        self.known.push(key);
        match self.map.get(key) {
            None | Some(serde_json::Value::Null) => Ok(default),
            Some(serde_json::Value::Bool(b)) => Ok(*b),
            Some(v) => Err(case_err(
                self.case,
                format!("param `{key}` must be a bool, got {v}"),
            )),
        }
    }

    /// One of `choices` (the first is the default when absent or null).
    fn choice(&mut self, key: &'static str, choices: &[&'static str]) -> Result<&'static str> {
        self.known.push(key);
        match self.map.get(key) {
            None | Some(serde_json::Value::Null) => Ok(choices[0]),
            Some(serde_json::Value::String(v)) => choices
                .iter()
                .find(|c| **c == v.as_str())
                .copied()
                .ok_or_else(|| {
                    case_err(
                        self.case,
                        format!("param `{key}` must be one of {choices:?}, got {v:?}"),
                    )
                }),
            Some(v) => Err(case_err(
                self.case,
                format!("param `{key}` must be a string, got {v}"),
            )),
        }
    }

    /// A number, or null / absent for `None`.
    fn optional_number(&mut self, key: &'static str) -> Result<Option<f64>> {
        self.known.push(key);
        match self.map.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                case_err(
                    self.case,
                    format!("param `{key}` must be a number or null, got {v}"),
                )
            }),
        }
    }

    fn finish(self) -> Result<()> {
        match self.map.keys().find(|k| !self.known.contains(&k.as_str())) {
            Some(k) => Err(case_err(self.case, format!("unknown param `{k}`"))),
            None => Ok(()),
        }
    }
}

/// Where a case runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// The host CPU.
    Cpu,
    /// A CUDA device (or the project's CUDA emulator).
    Cuda,
}

impl DeviceKind {
    /// `"cpu"` or `"cuda"`, as the report lines print it.
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
        }
    }
}

/// Runs cases on one device.
pub struct Runner {
    kind: DeviceKind,
    #[cfg(feature = "cuda")]
    cuda: Option<crate::cuda::Device>,
}

impl Runner {
    /// A runner on the CPU.
    pub fn cpu() -> Runner {
        Runner {
            kind: DeviceKind::Cpu,
            #[cfg(feature = "cuda")]
            cuda: None,
        }
    }

    /// A runner on CUDA device 0. `Err(NoDevice)` without a GPU (or without the `cuda`
    /// feature).
    pub fn cuda() -> Result<Runner> {
        #[cfg(feature = "cuda")]
        {
            Ok(Runner {
                kind: DeviceKind::Cuda,
                cuda: Some(crate::cuda::Device::open(0)?),
            })
        }
        #[cfg(not(feature = "cuda"))]
        {
            Err(Error::NoDevice("this build has no `cuda` feature".into()))
        }
    }

    /// The device kind the runner runs cases on.
    pub fn kind(&self) -> DeviceKind {
        self.kind
    }

    /// The CUDA device's name (it says so when the device is the project's emulator); `None`
    /// on the CPU.
    pub fn device_name(&self) -> Option<String> {
        #[cfg(feature = "cuda")]
        {
            self.cuda.as_ref().and_then(|d| d.name().ok())
        }
        #[cfg(not(feature = "cuda"))]
        {
            None
        }
    }

    /// The runner's CUDA device, or `Err(NoDevice)`.
    #[cfg(feature = "cuda")]
    fn device(&self) -> Result<&crate::cuda::Device> {
        self.cuda
            .as_ref()
            .ok_or_else(|| Error::NoDevice("runner has no device".into()))
    }

    /// Runs the case's op on its inputs; returns the outputs by name.
    /// `Err(OpNotImplemented)` for an op this build does not run.
    pub fn run(&self, case: &Case) -> Result<BTreeMap<String, Tensor>> {
        if !CONTRACT_OPS.contains(&case.op.as_str()) && !EXTENSION_OPS.contains(&case.op.as_str()) {
            return Err(case_err(
                &case.name,
                format!("unknown op `{}` (not in the contract)", case.op),
            ));
        }
        match case.op.as_str() {
            "attention.forward" => self.attention(case, AttentionOp::Forward),
            "attention.backward" => self.attention(case, AttentionOp::Backward),
            "attention.top_keys" => self.attention(case, AttentionOp::TopKeys),
            "scan.linear" => self.scan_linear(case, Numbers::Real),
            "scan.linear_backward" => self.scan_linear_backward(case, Numbers::Real),
            "scan.linear_complex" => self.scan_linear(case, Numbers::Complex),
            "scan.linear_complex_backward" => self.scan_linear_backward(case, Numbers::Complex),
            "scan.selective" => self.scan_selective(case, false),
            "scan.selective_backward" => self.scan_selective(case, true),
            "scan.gla" => self.scan_gla(case, false),
            "scan.gla_backward" => self.scan_gla(case, true),
            "ridge.cv" => self.ridge_cv(case),
            "ridge.banded_cv" => self.ridge_banded_cv(case),
            "ridge.split_scores" => self.ridge_split_scores(case),
            "ridge.solve_batched" => self.ridge_solve_batched(case),
            "ridge.score" => self.ridge_score(case),
            "topk.rows" => self.topk_rows(case),
            "sae.encode" | "sae.encode_batch_topk" | "sae.encode_jumprelu" => self.sae_encode(case),
            "sae.decode" => self.sae_decode(case),
            "sae.backward" => self.sae_backward(case),
            "sae.encode_mp" => self.sae_encode_mp(case),
            "codebook.nearest" => self.codebook_nearest(case),
            other => Err(Error::OpNotImplemented(other.to_string())),
        }
    }

    fn scan_linear(&self, case: &Case, numbers: Numbers) -> Result<BTreeMap<String, Tensor>> {
        case.only_inputs(&["a", "b", "h0"])?;
        let params = scan_params(case)?;
        let (shape, dims, state_dims) = scan_shapes(case, numbers)?;
        same_shape(case, "b", &dims)?;
        if let Some(h0) = case.inputs.get("h0") {
            expect_shape("h0", &h0.shape, &state_dims)?;
        }
        let run = ScanCall {
            runner: self,
            case,
            params,
            shape,
            numbers,
        };
        let h = match case.input("a")?.dtype() {
            Some(DType::F32) => run.forward::<f32>()?,
            Some(DType::F64) => run.forward::<f64>()?,
            Some(DType::F16) => run.forward::<f16>()?,
            Some(DType::BF16) => run.forward::<bf16>()?,
            None => return Err(case_err(&case.name, "`in.a` must be a float tensor")),
        };
        Ok(BTreeMap::from([(
            "h".to_string(),
            Tensor {
                shape: dims,
                data: h,
            },
        )]))
    }

    fn scan_linear_backward(
        &self,
        case: &Case,
        numbers: Numbers,
    ) -> Result<BTreeMap<String, Tensor>> {
        case.only_inputs(&["a", "h", "dh", "h0"])?;
        let params = scan_params(case)?;
        let (shape, dims, state_dims) = scan_shapes(case, numbers)?;
        same_shape(case, "h", &dims)?;
        same_shape(case, "dh", &dims)?;
        if let Some(h0) = case.inputs.get("h0") {
            expect_shape("h0", &h0.shape, &state_dims)?;
        }
        let run = ScanCall {
            runner: self,
            case,
            params,
            shape,
            numbers,
        };
        let (da, db, dh0) = match case.input("a")?.dtype() {
            Some(DType::F32) => run.backward::<f32>()?,
            Some(DType::F64) => run.backward::<f64>()?,
            Some(DType::F16) => run.backward::<f16>()?,
            Some(DType::BF16) => run.backward::<bf16>()?,
            None => return Err(case_err(&case.name, "`in.a` must be a float tensor")),
        };
        Ok(BTreeMap::from([
            (
                "da".to_string(),
                Tensor {
                    shape: dims.clone(),
                    data: da,
                },
            ),
            (
                "db".to_string(),
                Tensor {
                    shape: dims,
                    data: db,
                },
            ),
            (
                "dh0".to_string(),
                Tensor {
                    shape: state_dims,
                    data: dh0,
                },
            ),
        ]))
    }
}

impl Runner {
    fn scan_selective(&self, case: &Case, backward: bool) -> Result<BTreeMap<String, Tensor>> {
        let mut allowed = vec![
            "u",
            "delta",
            "A",
            "Bm",
            "Cm",
            "Dskip",
            "z",
            "delta_bias",
            "h0",
        ];
        if backward {
            allowed.push("dy");
        }
        case.only_inputs(&allowed)?;
        let mut p = Params::new(case);
        let params = SelectiveParams::new().delta_softplus(p.bool("delta_softplus", false)?);
        p.finish()?;
        let shape = SelectiveShape::from_dims(&case.input("u")?.shape, &case.input("A")?.shape)?;
        let (b, t, d, n) = (shape.batch, shape.len, shape.channels, shape.state);
        let mut required = vec![
            ("delta", vec![b, t, d]),
            ("Bm", vec![b, t, n]),
            ("Cm", vec![b, t, n]),
        ];
        if backward {
            required.push(("dy", vec![b, t, d]));
        }
        for (name, dims) in required {
            same_shape(case, name, &dims)?;
        }
        for (name, dims) in [
            ("Dskip", vec![d]),
            ("z", vec![b, t, d]),
            ("delta_bias", vec![d]),
            ("h0", vec![b, d, n]),
        ] {
            if let Some(x) = case.inputs.get(name) {
                expect_shape(name, &x.shape, &dims)?;
            }
        }
        let outputs = match case.input("u")?.dtype() {
            Some(DType::F32) => selective_typed::<f32>(self, case, &params, shape, backward)?,
            Some(DType::F64) => selective_typed::<f64>(self, case, &params, shape, backward)?,
            Some(DType::F16) => selective_typed::<f16>(self, case, &params, shape, backward)?,
            Some(DType::BF16) => selective_typed::<bf16>(self, case, &params, shape, backward)?,
            None => return Err(case_err(&case.name, "`in.u` must be a float tensor")),
        };
        Ok(outputs)
    }
}

/// Runs `scan.selective` (or its backward) with sequences in `E` and parameters in its
/// accumulator type.
fn selective_typed<E: RunElement>(
    runner: &Runner,
    case: &Case,
    params: &SelectiveParams,
    shape: SelectiveShape,
    backward: bool,
) -> Result<BTreeMap<String, Tensor>>
where
    E::Acc: CaseElement,
{
    let inputs = SelectiveInputs::<E> {
        u: typed::<E>(case, "u")?,
        delta: typed::<E>(case, "delta")?,
        a: typed::<E::Acc>(case, "A")?,
        bm: typed::<E>(case, "Bm")?,
        cm: typed::<E>(case, "Cm")?,
        dskip: optional::<E::Acc>(case, "Dskip")?,
        z: optional::<E>(case, "z")?,
        delta_bias: optional::<E::Acc>(case, "delta_bias")?,
        h0: optional::<E::Acc>(case, "h0")?,
    };
    let (b, t, d, n) = (shape.batch, shape.len, shape.channels, shape.state);
    let seq = || vec![b, t, d];
    let mut out = BTreeMap::new();
    let mut put = |name: &str, dims: Vec<usize>, data: Data| {
        out.insert(name.to_string(), Tensor { shape: dims, data });
    };
    if !backward {
        let (y, h_last) = match runner.kind {
            DeviceKind::Cpu => selective(params, shape, &inputs).map(|r| (r.y, r.h_last))?,
            DeviceKind::Cuda => E::cuda_selective(runner, params, shape, &inputs)?,
        };
        put("y", seq(), E::wrap(y));
        put(
            "h_last",
            vec![b, d, n],
            <E::Acc as CaseElement>::wrap(h_last),
        );
        return Ok(out);
    }
    let dy = typed::<E>(case, "dy")?;
    let g = match runner.kind {
        DeviceKind::Cpu => selective_backward(params, shape, &inputs, dy)?,
        DeviceKind::Cuda => E::cuda_selective_backward(runner, params, shape, &inputs, dy)?,
    };
    put("du", seq(), E::wrap(g.du));
    put("ddelta", seq(), E::wrap(g.ddelta));
    put("dA", vec![d, n], <E::Acc as CaseElement>::wrap(g.da));
    put("dBm", vec![b, t, n], E::wrap(g.dbm));
    put("dCm", vec![b, t, n], E::wrap(g.dcm));
    if let Some(v) = g.ddskip {
        put("dDskip", vec![d], <E::Acc as CaseElement>::wrap(v));
    }
    if let Some(v) = g.dz {
        put("dz", seq(), E::wrap(v));
    }
    if let Some(v) = g.ddelta_bias {
        put("ddelta_bias", vec![d], <E::Acc as CaseElement>::wrap(v));
    }
    if let Some(v) = g.dh0 {
        put("dh0", vec![b, d, n], <E::Acc as CaseElement>::wrap(v));
    }
    Ok(out)
}

impl Runner {
    fn scan_gla(&self, case: &Case, backward: bool) -> Result<BTreeMap<String, Tensor>> {
        let mut allowed = vec!["q", "k", "v", "g", "h0"];
        if backward {
            allowed.extend(["do", "dh_last"]);
        }
        case.only_inputs(&allowed)?;
        let mut p = Params::new(case);
        let params = GlaParams::new().scale(p.optional_number("scale")?);
        p.finish()?;
        let shape = GlaShape::from_dims(&case.input("q")?.shape, &case.input("v")?.shape)?;
        let (b, t, h, k, v) = (
            shape.batch,
            shape.len,
            shape.heads,
            shape.key_dim,
            shape.value_dim,
        );
        same_shape(case, "k", &[b, t, h, k])?;
        same_shape(case, "g", &[b, t, h, k])?;
        if backward {
            same_shape(case, "do", &[b, t, h, v])?;
        }
        for name in ["h0", "dh_last"] {
            if let Some(x) = case.inputs.get(name) {
                expect_shape(name, &x.shape, &[b, h, k, v])?;
            }
        }
        match case.input("q")?.dtype() {
            Some(DType::F32) => gla_typed::<f32>(self, case, &params, shape, backward),
            Some(DType::F64) => gla_typed::<f64>(self, case, &params, shape, backward),
            Some(DType::F16) => gla_typed::<f16>(self, case, &params, shape, backward),
            Some(DType::BF16) => gla_typed::<bf16>(self, case, &params, shape, backward),
            None => Err(case_err(&case.name, "`in.q` must be a float tensor")),
        }
    }
}

/// Runs `scan.gla` (or its backward) with inputs in `E` and states in its accumulator type.
fn gla_typed<E: RunElement>(
    runner: &Runner,
    case: &Case,
    params: &GlaParams,
    shape: GlaShape,
    backward: bool,
) -> Result<BTreeMap<String, Tensor>>
where
    E::Acc: CaseElement,
{
    let inputs = GlaInputs::<E> {
        q: typed::<E>(case, "q")?,
        k: typed::<E>(case, "k")?,
        v: typed::<E>(case, "v")?,
        g: typed::<E>(case, "g")?,
        h0: optional::<E::Acc>(case, "h0")?,
    };
    let (b, t, h, k, v) = (
        shape.batch,
        shape.len,
        shape.heads,
        shape.key_dim,
        shape.value_dim,
    );
    let mut out = BTreeMap::new();
    if !backward {
        let (o, h_last) = match runner.kind {
            DeviceKind::Cpu => gla(params, shape, &inputs).map(|r| (r.o, r.h_last))?,
            DeviceKind::Cuda => E::cuda_gla(runner, params, shape, &inputs)?,
        };
        out.insert(
            "o".to_string(),
            Tensor {
                shape: vec![b, t, h, v],
                data: E::wrap(o),
            },
        );
        out.insert(
            "h_last".to_string(),
            Tensor {
                shape: vec![b, h, k, v],
                data: <E::Acc as CaseElement>::wrap(h_last),
            },
        );
        return Ok(out);
    }
    let (d_o, dh_last) = (
        typed::<E>(case, "do")?,
        optional::<E::Acc>(case, "dh_last")?,
    );
    let g = match runner.kind {
        DeviceKind::Cpu => gla_backward(params, shape, &inputs, d_o, dh_last)?,
        DeviceKind::Cuda => E::cuda_gla_backward(runner, params, shape, &inputs, d_o, dh_last)?,
    };
    for (name, data, dims) in [
        ("dq", g.dq, k),
        ("dk", g.dk, k),
        ("dv", g.dv, v),
        ("dg", g.dg, k),
    ] {
        out.insert(
            name.to_string(),
            Tensor {
                shape: vec![b, t, h, dims],
                data: E::wrap(data),
            },
        );
    }
    if let Some(dh0) = g.dh0 {
        out.insert(
            "dh0".to_string(),
            Tensor {
                shape: vec![b, h, k, v],
                data: <E::Acc as CaseElement>::wrap(dh0),
            },
        );
    }
    Ok(out)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum AttentionOp {
    Forward,
    Backward,
    TopKeys,
}

impl Runner {
    fn attention(&self, case: &Case, op: AttentionOp) -> Result<BTreeMap<String, Tensor>> {
        let mut allowed = vec![
            "q",
            "k",
            "alibi_slopes",
            "bias",
            "cu_seqlens_q",
            "cu_seqlens_k",
        ];
        match op {
            AttentionOp::Forward => allowed.push("v"),
            AttentionOp::Backward => allowed.extend(["v", "o", "do", "lse"]),
            AttentionOp::TopKeys => {}
        }
        case.only_inputs(&allowed)?;
        let mut p = Params::new(case);
        let window = |p: &mut Params, key| -> Result<i64> {
            match p.optional_number(key)? {
                None => Ok(-1),
                Some(x) if x.fract() == 0.0 && x.abs() < 9e15 => Ok(x as i64),
                Some(x) => Err(case_err(
                    &case.name,
                    format!("param `{key}` must be an integer, got {x}"),
                )),
            }
        };
        let params = AttentionParams::new()
            .causal(p.bool("causal", false)?)
            .window_left(window(&mut p, "window_left")?)
            .window_right(window(&mut p, "window_right")?)
            .softcap(p.optional_number("softcap")?.unwrap_or(0.0))
            .scale(p.optional_number("scale")?);
        let top = if op == AttentionOp::TopKeys {
            match p.optional_number("top")? {
                Some(x) if x.fract() == 0.0 && (0.0..9e15).contains(&x) => x as usize,
                other => {
                    return Err(case_err(
                        &case.name,
                        format!("param `top` must be a non-negative integer, got {other:?}"),
                    ));
                }
            }
        } else {
            0
        };
        p.finish()?;
        let v_dims = match op {
            AttentionOp::TopKeys => None,
            _ => Some(case.input("v")?.shape.as_slice()),
        };
        let shape =
            AttentionShape::from_dims(&case.input("q")?.shape, &case.input("k")?.shape, v_dims)?;
        let s = shape;
        if let Some(x) = case.inputs.get("alibi_slopes") {
            expect_shape("alibi_slopes", &x.shape, &[s.heads_q])?;
        }
        if let Some(x) = case.inputs.get("bias")
            && (x.shape.len() != 4 || x.shape[2..] != [s.len_q, s.len_k])
        {
            return Err(Error::shape(
                "bias",
                format!("[Bb, Hb, {}, {}]", s.len_q, s.len_k),
                format!("{:?}", x.shape),
            ));
        }
        if op == AttentionOp::Backward {
            let o_dims = [s.batch, s.len_q, s.heads_q, s.value_dim];
            same_shape(case, "o", &o_dims)?;
            same_shape(case, "do", &o_dims)?;
            same_shape(case, "lse", &[s.batch, s.heads_q, s.len_q])?;
        }
        match case.input("q")?.dtype() {
            Some(DType::F32) => attention_typed::<f32>(self, case, op, &params, shape, top),
            Some(DType::F64) => attention_typed::<f64>(self, case, op, &params, shape, top),
            Some(DType::F16) => attention_typed::<f16>(self, case, op, &params, shape, top),
            Some(DType::BF16) => attention_typed::<bf16>(self, case, op, &params, shape, top),
            None => Err(case_err(&case.name, "`in.q` must be a float tensor")),
        }
    }
}

/// An I32 input of a case.
fn indices<'c>(case: &'c Case, name: &str) -> Result<Option<&'c [i32]>> {
    match case.inputs.get(name).map(|t| &t.data) {
        None => Ok(None),
        Some(Data::I32(v)) => Ok(Some(v)),
        Some(_) => Err(case_err(&case.name, format!("`in.{name}` must be I32"))),
    }
}

/// Runs an attention op with inputs in `E` and the contract's f32 tensors in its accumulator.
fn attention_typed<E: RunElement>(
    runner: &Runner,
    case: &Case,
    op: AttentionOp,
    params: &AttentionParams,
    shape: AttentionShape,
    top: usize,
) -> Result<BTreeMap<String, Tensor>>
where
    E::Acc: CaseElement,
{
    let bias = match case.inputs.get("bias") {
        None => None,
        Some(t) => Some(Bias {
            data: typed::<E::Acc>(case, "bias")?,
            batch: t.shape[0],
            heads: t.shape[1],
        }),
    };
    let cu_seqlens = match (
        indices(case, "cu_seqlens_q")?,
        indices(case, "cu_seqlens_k")?,
    ) {
        (None, None) => None,
        (Some(q), Some(k)) => Some(CuSeqlens { q, k }),
        _ => {
            return Err(case_err(
                &case.name,
                "`in.cu_seqlens_q` and `in.cu_seqlens_k` come together",
            ));
        }
    };
    let v: &[E] = match op {
        AttentionOp::TopKeys => &[],
        _ => typed::<E>(case, "v")?,
    };
    let inputs = AttentionInputs::new(typed::<E>(case, "q")?, typed::<E>(case, "k")?, v)
        .alibi_slopes(optional::<E::Acc>(case, "alibi_slopes")?)
        .bias(bias)
        .cu_seqlens(cu_seqlens);
    let s = shape;
    let cuda = runner.kind() == DeviceKind::Cuda;
    let mut out = BTreeMap::new();
    let mut put = |name: &str, shape: Vec<usize>, data: Data| {
        out.insert(name.to_string(), Tensor { shape, data });
    };
    match op {
        AttentionOp::Forward => {
            let (o, lse) = if cuda {
                E::cuda_attention_forward(runner, params, shape, &inputs)?
            } else {
                attention::forward(params, shape, &inputs).map(|r| (r.o, r.lse))?
            };
            put(
                "o",
                vec![s.batch, s.len_q, s.heads_q, s.value_dim],
                E::wrap(o),
            );
            put(
                "lse",
                vec![s.batch, s.heads_q, s.len_q],
                <E::Acc as CaseElement>::wrap(lse),
            );
        }
        AttentionOp::Backward => {
            let (o, d_o, lse) = (
                typed::<E>(case, "o")?,
                typed::<E>(case, "do")?,
                typed::<E::Acc>(case, "lse")?,
            );
            let g = if cuda {
                E::cuda_attention_backward(runner, params, shape, &inputs, o, d_o, lse)?
            } else {
                attention::backward(params, shape, &inputs, o, d_o, lse)?
            };
            put("dq", case.input("q")?.shape.clone(), E::wrap(g.dq));
            put("dk", case.input("k")?.shape.clone(), E::wrap(g.dk));
            put("dv", case.input("v")?.shape.clone(), E::wrap(g.dv));
        }
        AttentionOp::TopKeys => {
            let (w, i) = if cuda {
                E::cuda_attention_top_keys(runner, params, shape, &inputs, top)?
            } else {
                attention::top_keys(params, shape, &inputs, top).map(|r| (r.weights, r.indices))?
            };
            let dims = vec![s.batch, s.heads_q, s.len_q, top];
            put("weights", dims.clone(), <E::Acc as CaseElement>::wrap(w));
            put("indices", dims, Data::I32(i));
        }
    }
    Ok(out)
}

impl Runner {
    fn ridge_cv(&self, case: &Case) -> Result<BTreeMap<String, Tensor>> {
        case.only_inputs(&["x", "y", "alphas", "folds"])?;
        let mut p = Params::new(case);
        let score = match p.choice("score", &["r2", "pearson"])? {
            "pearson" => ridge::CvScore::Pearson,
            _ => ridge::CvScore::R2,
        };
        let center = p.bool("center", true)?;
        p.finish()?;
        let params = ridge::CvParams::new().score(score).center(center);
        let [n, features] = case.input("x")?.shape[..] else {
            return Err(Error::shape(
                "x",
                "rank 2 [n, p]",
                format!("{:?}", case.input("x")?.shape),
            ));
        };
        let y_shape = case.input("y")?.shape.clone();
        let targets = match y_shape[..] {
            [yn, t] if yn == n => t,
            _ => {
                return Err(Error::shape(
                    "y",
                    format!("[{n}, t]"),
                    format!("{y_shape:?}"),
                ));
            }
        };
        let alphas = case.input("alphas")?.shape.clone();
        let [n_alphas] = alphas[..] else {
            return Err(Error::shape("alphas", "rank 1 [A]", format!("{alphas:?}")));
        };
        same_shape(case, "folds", &[n])?;
        let folds = match &case.input("folds")?.data {
            Data::I32(v) => v.as_slice(),
            _ => return Err(case_err(&case.name, "`in.folds` must be an index tensor")),
        };
        fn run<E: RidgeElement>(
            runner: &Runner,
            case: &Case,
            params: &ridge::CvParams,
            (n, p, t): (usize, usize, usize),
            folds: &[i32],
        ) -> Result<[Data; 4]> {
            let inputs = ridge::CvInputs {
                x: typed::<E>(case, "x")?,
                y: typed::<E>(case, "y")?,
                alphas: typed::<E>(case, "alphas")?,
                folds,
            };
            let fit = match runner.kind {
                DeviceKind::Cpu => {
                    ridge::cv(params, ridge::RidgeShape::new(n, p, t), &inputs, None)?
                }
                DeviceKind::Cuda => E::cuda_cv(runner, params, (n, p, t), &inputs)?,
            };
            Ok([
                E::wrap(fit.cv_scores),
                E::wrap(fit.best_alpha),
                E::wrap(fit.w),
                E::wrap(fit.intercept),
            ])
        }
        let dims = (n, features, targets);
        let [cv_scores, best_alpha, w, intercept] = match case.input("x")?.dtype() {
            Some(DType::F32) => run::<f32>(self, case, &params, dims, folds)?,
            Some(DType::F64) => run::<f64>(self, case, &params, dims, folds)?,
            _ => return Err(case_err(&case.name, "`in.x` must be F32 or F64")),
        };
        let mut out = BTreeMap::new();
        for (name, shape, data) in [
            ("cv_scores", vec![n_alphas, targets], cv_scores),
            ("best_alpha", vec![targets], best_alpha),
            ("w", vec![features, targets], w),
            ("intercept", vec![targets], intercept),
        ] {
            out.insert(name.to_string(), Tensor { shape, data });
        }
        Ok(out)
    }

    fn ridge_banded_cv(&self, case: &Case) -> Result<BTreeMap<String, Tensor>> {
        case.only_inputs(&["x", "groups", "y", "alphas", "gammas", "folds"])?;
        let mut p = Params::new(case);
        let score = match p.choice("score", &["r2", "pearson"])? {
            "pearson" => ridge::CvScore::Pearson,
            _ => ridge::CvScore::R2,
        };
        let center = p.bool("center", true)?;
        p.finish()?;
        let params = ridge::CvParams::new().score(score).center(center);
        let (n, features, targets) = ridge_design(case)?;
        let gammas = case.input("gammas")?.shape.clone();
        let [candidates, spaces] = gammas[..] else {
            return Err(Error::shape(
                "gammas",
                "rank 2 [C, S]",
                format!("{gammas:?}"),
            ));
        };
        same_shape(case, "folds", &[n])?;
        same_shape(case, "groups", &[features])?;
        if case.input("alphas")?.shape.len() != 1 {
            let got = format!("{:?}", case.input("alphas")?.shape);
            return Err(Error::shape("alphas", "rank 1 [A]", got));
        }
        let (folds, groups) = (index_input(case, "folds")?, index_input(case, "groups")?);
        fn run<E: RidgeElement>(
            runner: &Runner,
            case: &Case,
            params: &ridge::CvParams,
            shape: ridge::BandedShape,
            folds: &[i32],
            groups: &[i32],
        ) -> Result<[Data; 4]> {
            let inputs = ridge::BandedInputs {
                x: typed::<E>(case, "x")?,
                groups,
                y: typed::<E>(case, "y")?,
                alphas: typed::<E>(case, "alphas")?,
                gammas: typed::<E>(case, "gammas")?,
                folds,
            };
            let fit = match runner.kind {
                DeviceKind::Cuda => E::cuda_banded_cv(runner, params, shape, &inputs)?,
                DeviceKind::Cpu => ridge::banded_cv(params, shape, &inputs, None)?,
            };
            Ok([
                E::wrap(fit.cv_scores),
                E::wrap(fit.deltas),
                E::wrap(fit.w),
                E::wrap(fit.intercept),
            ])
        }
        let shape = ridge::BandedShape::new(n, features, targets, spaces);
        let [cv_scores, deltas, w, intercept] = match case.input("x")?.dtype() {
            Some(DType::F32) => run::<f32>(self, case, &params, shape, folds, groups)?,
            Some(DType::F64) => run::<f64>(self, case, &params, shape, folds, groups)?,
            _ => return Err(case_err(&case.name, "`in.x` must be F32 or F64")),
        };
        let mut out = BTreeMap::new();
        for (name, shape, data) in [
            ("cv_scores", vec![candidates, targets], cv_scores),
            ("deltas", vec![spaces, targets], deltas),
            ("w", vec![features, targets], w),
            ("intercept", vec![targets], intercept),
        ] {
            out.insert(name.to_string(), Tensor { shape, data });
        }
        Ok(out)
    }

    /// `ridge.split_scores`: S is the largest group id + 1 (the contract gives no S input;
    /// a space without a column is then an `Err`). `intercept` is checked and does not enter
    /// (both splits center).
    fn ridge_split_scores(&self, case: &Case) -> Result<BTreeMap<String, Tensor>> {
        case.only_inputs(&["x", "groups", "w", "intercept", "y"])?;
        let mut p = Params::new(case);
        let r2 = p.choice("score", &["r2", "pearson"])? == "r2";
        p.finish()?;
        let (n, features, targets) = ridge_design(case)?;
        same_shape(case, "groups", &[features])?;
        same_shape(case, "w", &[features, targets])?;
        same_shape(case, "intercept", &[targets])?;
        let groups = index_input(case, "groups")?;
        let spaces = groups
            .iter()
            .map(|g| (*g).max(0) as usize + 1)
            .max()
            .unwrap_or(0);
        fn run<E: RidgeElement>(
            runner: &Runner,
            case: &Case,
            shape: ridge::BandedShape,
            groups: &[i32],
            r2: bool,
        ) -> Result<Data> {
            typed::<E>(case, "intercept")?;
            let (x, w, y) = (
                typed::<E>(case, "x")?,
                typed::<E>(case, "w")?,
                typed::<E>(case, "y")?,
            );
            let s = match runner.kind {
                DeviceKind::Cuda => E::cuda_split_scores(runner, shape, x, groups, w, y)?,
                DeviceKind::Cpu => ridge::split_scores(shape, x, groups, w, y)?,
            };
            Ok(E::wrap(if r2 { s.r2 } else { s.pearson }))
        }
        let shape = ridge::BandedShape::new(n, features, targets, spaces);
        let data = match case.input("x")?.dtype() {
            Some(DType::F32) => run::<f32>(self, case, shape, groups, r2)?,
            Some(DType::F64) => run::<f64>(self, case, shape, groups, r2)?,
            _ => return Err(case_err(&case.name, "`in.x` must be F32 or F64")),
        };
        let mut out = BTreeMap::new();
        out.insert(
            "scores".to_string(),
            Tensor {
                shape: vec![spaces, targets],
                data,
            },
        );
        Ok(out)
    }

    fn ridge_solve_batched(&self, case: &Case) -> Result<BTreeMap<String, Tensor>> {
        case.only_inputs(&["x", "y", "alpha"])?;
        Params::new(case).finish()?;
        let [g, n, p] = case.input("x")?.shape[..] else {
            return Err(Error::shape(
                "x",
                "rank 3 [G, n, p]",
                format!("{:?}", case.input("x")?.shape),
            ));
        };
        let y_shape = &case.input("y")?.shape;
        let t = match y_shape[..] {
            [yg, yn, t] if (yg, yn) == (g, n) => t,
            _ => {
                return Err(Error::shape(
                    "y",
                    format!("[{g}, {n}, t]"),
                    format!("{y_shape:?}"),
                ));
            }
        };
        same_shape(case, "alpha", &[g])?;
        let shape = ridge::BatchedShape::new(g, n, p, t);
        fn run<E: RidgeElement>(
            runner: &Runner,
            case: &Case,
            shape: ridge::BatchedShape,
        ) -> Result<Data> {
            let (x, y, alpha) = (
                typed::<E>(case, "x")?,
                typed::<E>(case, "y")?,
                typed::<E>(case, "alpha")?,
            );
            let w = match runner.kind {
                DeviceKind::Cpu => ridge::solve_batched(shape, x, y, alpha)?,
                DeviceKind::Cuda => E::cuda_solve_batched(runner, shape, x, y, alpha)?,
            };
            Ok(E::wrap(w))
        }
        let data = match case.input("x")?.dtype() {
            Some(DType::F32) => run::<f32>(self, case, shape)?,
            Some(DType::F64) => run::<f64>(self, case, shape)?,
            _ => return Err(case_err(&case.name, "`in.x` must be F32 or F64")),
        };
        let mut out = BTreeMap::new();
        out.insert(
            "w".to_string(),
            Tensor {
                shape: vec![g, p, t],
                data,
            },
        );
        Ok(out)
    }

    fn ridge_score(&self, case: &Case) -> Result<BTreeMap<String, Tensor>> {
        case.only_inputs(&["y_true", "y_pred"])?;
        Params::new(case).finish()?;
        let dims = case.input("y_true")?.shape.clone();
        let [n, t] = dims[..] else {
            return Err(Error::shape("y_true", "rank 2 [n, t]", format!("{dims:?}")));
        };
        same_shape(case, "y_pred", &dims)?;
        fn run<E: RidgeElement>(
            runner: &Runner,
            case: &Case,
            n: usize,
            t: usize,
        ) -> Result<(Data, Data)> {
            let (y_true, y_pred) = (typed::<E>(case, "y_true")?, typed::<E>(case, "y_pred")?);
            let (r2, pearson) = match runner.kind {
                DeviceKind::Cpu => ridge::score(ridge::RidgeShape::new(n, 0, t), y_true, y_pred)
                    .map(|s| (s.r2, s.pearson))?,
                DeviceKind::Cuda => E::cuda_score(runner, (n, t), y_true, y_pred)?,
            };
            Ok((E::wrap(r2), E::wrap(pearson)))
        }
        let (r2, pearson) = match case.input("y_true")?.dtype() {
            Some(DType::F32) => run::<f32>(self, case, n, t)?,
            Some(DType::F64) => run::<f64>(self, case, n, t)?,
            _ => return Err(case_err(&case.name, "`in.y_true` must be F32 or F64")),
        };
        let mut out = BTreeMap::new();
        for (name, data) in [("r2", r2), ("pearson", pearson)] {
            out.insert(
                name.to_string(),
                Tensor {
                    shape: vec![t],
                    data,
                },
            );
        }
        Ok(out)
    }
}

fn scan_params(case: &Case) -> Result<ScanParams> {
    let mut p = Params::new(case);
    let params = ScanParams::new().reverse(p.bool("reverse", false)?);
    p.finish()?;
    Ok(params)
}

/// The scan shape of `in.a`, with the dims of the sequence tensors and of the state.
fn scan_shapes(case: &Case, numbers: Numbers) -> Result<(ScanShape, Vec<usize>, Vec<usize>)> {
    let a = case.input("a")?;
    Ok(match numbers {
        Numbers::Real => {
            let s = ScanShape::from_dims("a", &a.shape)?;
            (
                s,
                vec![s.batch, s.len, s.channels],
                vec![s.batch, s.channels],
            )
        }
        Numbers::Complex => {
            let s = ScanShape::from_complex_dims("a", &a.shape)?;
            (
                s,
                vec![s.batch, s.len, s.channels, 2],
                vec![s.batch, s.channels, 2],
            )
        }
    })
}

/// One scan case being run: its inputs are read as `E` once the dtype is known.
struct ScanCall<'a> {
    runner: &'a Runner,
    case: &'a Case,
    params: ScanParams,
    shape: ScanShape,
    numbers: Numbers,
}

impl ScanCall<'_> {
    fn forward<E: RunElement>(&self) -> Result<Data> {
        let (case, p, shape) = (self.case, &self.params, self.shape);
        let (a, b, h0) = (
            typed::<E>(case, "a")?,
            typed::<E>(case, "b")?,
            optional::<E>(case, "h0")?,
        );
        let h = match (self.runner.kind, self.numbers) {
            (DeviceKind::Cpu, Numbers::Real) => scan::linear(p, shape, a, b, h0)?,
            (DeviceKind::Cpu, Numbers::Complex) => scan::linear_complex(p, shape, a, b, h0)?,
            (DeviceKind::Cuda, numbers) => {
                E::cuda_scan_linear(self.runner, numbers, p, shape, a, b, h0)?
            }
        };
        Ok(E::wrap(h))
    }

    fn backward<E: RunElement>(&self) -> Result<(Data, Data, Data)> {
        let (case, p, shape) = (self.case, &self.params, self.shape);
        let (a, h, dh) = (
            typed::<E>(case, "a")?,
            typed::<E>(case, "h")?,
            typed::<E>(case, "dh")?,
        );
        let h0 = optional::<E>(case, "h0")?;
        let g = match (self.runner.kind, self.numbers) {
            (DeviceKind::Cpu, Numbers::Real) => scan::linear_backward(p, shape, a, h, dh, h0)?,
            (DeviceKind::Cpu, Numbers::Complex) => {
                scan::linear_complex_backward(p, shape, a, h, dh, h0)?
            }
            (DeviceKind::Cuda, numbers) => {
                E::cuda_scan_linear_backward(self.runner, numbers, p, shape, a, h, dh, h0)?
            }
        };
        Ok((E::wrap(g.da), E::wrap(g.db), E::wrap(g.dh0)))
    }
}

/// The element types of the ridge ops (f32, f64), with their CUDA paths when the feature is on.
trait RidgeElement: CaseElement + ridge::cv::RidgeReal {
    fn cuda_solve_batched(
        runner: &Runner,
        shape: ridge::BatchedShape,
        x: &[Self],
        y: &[Self],
        alpha: &[Self],
    ) -> Result<Vec<Self>>;
    fn cuda_cv(
        runner: &Runner,
        params: &ridge::CvParams,
        dims: (usize, usize, usize),
        inputs: &ridge::CvInputs<'_, Self>,
    ) -> Result<ridge::CvFit<Self>>;
    fn cuda_score(
        runner: &Runner,
        dims: (usize, usize),
        y_true: &[Self],
        y_pred: &[Self],
    ) -> Result<(Vec<Self>, Vec<Self>)>;
    fn cuda_banded_cv(
        runner: &Runner,
        params: &ridge::CvParams,
        shape: ridge::BandedShape,
        inputs: &ridge::BandedInputs<'_, Self>,
    ) -> Result<ridge::BandedFit<Self>>;
    fn cuda_split_scores(
        runner: &Runner,
        shape: ridge::BandedShape,
        x: &[Self],
        groups: &[i32],
        w: &[Self],
        y: &[Self],
    ) -> Result<ridge::SplitScores<Self>>;
}

macro_rules! ridge_element {
    ($t:ty) => {
        impl RidgeElement for $t {
            #[allow(unused_variables)]
            fn cuda_solve_batched(
                runner: &Runner,
                shape: ridge::BatchedShape,
                x: &[Self],
                y: &[Self],
                alpha: &[Self],
            ) -> Result<Vec<Self>> {
                #[cfg(feature = "cuda")]
                {
                    ridge::cuda::solve_batched_host(runner.device()?, shape, x, y, alpha)
                }
                #[cfg(not(feature = "cuda"))]
                {
                    Err(Error::NoDevice("this build has no `cuda` feature".into()))
                }
            }
            #[allow(unused_variables)]
            fn cuda_cv(
                runner: &Runner,
                params: &ridge::CvParams,
                (n, p, t): (usize, usize, usize),
                inputs: &ridge::CvInputs<'_, Self>,
            ) -> Result<ridge::CvFit<Self>> {
                #[cfg(feature = "cuda")]
                {
                    ridge::cuda::cv_host(
                        runner.device()?,
                        params,
                        ridge::RidgeShape::new(n, p, t),
                        inputs,
                        None,
                    )
                }
                #[cfg(not(feature = "cuda"))]
                {
                    Err(Error::NoDevice("this build has no `cuda` feature".into()))
                }
            }
            #[allow(unused_variables)]
            fn cuda_banded_cv(
                runner: &Runner,
                params: &ridge::CvParams,
                shape: ridge::BandedShape,
                inputs: &ridge::BandedInputs<'_, Self>,
            ) -> Result<ridge::BandedFit<Self>> {
                #[cfg(feature = "cuda")]
                {
                    ridge::cuda::banded_cv_host(runner.device()?, params, shape, inputs, None)
                }
                #[cfg(not(feature = "cuda"))]
                {
                    Err(Error::NoDevice("this build has no `cuda` feature".into()))
                }
            }
            #[allow(unused_variables)]
            fn cuda_split_scores(
                runner: &Runner,
                shape: ridge::BandedShape,
                x: &[Self],
                groups: &[i32],
                w: &[Self],
                y: &[Self],
            ) -> Result<ridge::SplitScores<Self>> {
                #[cfg(feature = "cuda")]
                {
                    ridge::cuda::split_scores_host(runner.device()?, shape, x, groups, w, y)
                }
                #[cfg(not(feature = "cuda"))]
                {
                    Err(Error::NoDevice("this build has no `cuda` feature".into()))
                }
            }
            #[allow(unused_variables)]
            fn cuda_score(
                runner: &Runner,
                (n, t): (usize, usize),
                y_true: &[Self],
                y_pred: &[Self],
            ) -> Result<(Vec<Self>, Vec<Self>)> {
                #[cfg(feature = "cuda")]
                {
                    ridge::cuda::score_host(
                        runner.device()?,
                        ridge::RidgeShape::new(n, 0, t),
                        y_true,
                        y_pred,
                    )
                    .map(|s| (s.r2, s.pearson))
                }
                #[cfg(not(feature = "cuda"))]
                {
                    Err(Error::NoDevice("this build has no `cuda` feature".into()))
                }
            }
        }
    };
}
ridge_element!(f32);
ridge_element!(f64);

/// A case element that can also run on CUDA when the feature is on.
trait RunElement: CaseElement {
    fn cuda_selective(
        runner: &Runner,
        params: &SelectiveParams,
        shape: SelectiveShape,
        inputs: &SelectiveInputs<'_, Self>,
    ) -> Result<(Vec<Self>, Vec<Self::Acc>)>;
    fn cuda_selective_backward(
        runner: &Runner,
        params: &SelectiveParams,
        shape: SelectiveShape,
        inputs: &SelectiveInputs<'_, Self>,
        dy: &[Self],
    ) -> Result<SelectiveGrads<Self>>;
    fn cuda_gla(
        runner: &Runner,
        params: &GlaParams,
        shape: GlaShape,
        inputs: &GlaInputs<'_, Self>,
    ) -> Result<(Vec<Self>, Vec<Self::Acc>)>;
    fn cuda_gla_backward(
        runner: &Runner,
        params: &GlaParams,
        shape: GlaShape,
        inputs: &GlaInputs<'_, Self>,
        d_o: &[Self],
        dh_last: Option<&[Self::Acc]>,
    ) -> Result<GlaGrads<Self>>;
    fn cuda_scan_linear(
        runner: &Runner,
        numbers: Numbers,
        params: &ScanParams,
        shape: ScanShape,
        a: &[Self],
        b: &[Self],
        h0: Option<&[Self]>,
    ) -> Result<Vec<Self>>;
    #[allow(clippy::too_many_arguments)]
    fn cuda_scan_linear_backward(
        runner: &Runner,
        numbers: Numbers,
        params: &ScanParams,
        shape: ScanShape,
        a: &[Self],
        h: &[Self],
        dh: &[Self],
        h0: Option<&[Self]>,
    ) -> Result<scan::LinearGrads<Self>>;
    fn cuda_attention_forward(
        runner: &Runner,
        params: &AttentionParams,
        shape: AttentionShape,
        inputs: &AttentionInputs<'_, Self>,
    ) -> Result<(Vec<Self>, Vec<Self::Acc>)>;
    #[allow(clippy::too_many_arguments)]
    fn cuda_attention_backward(
        runner: &Runner,
        params: &AttentionParams,
        shape: AttentionShape,
        inputs: &AttentionInputs<'_, Self>,
        o: &[Self],
        d_o: &[Self],
        lse: &[Self::Acc],
    ) -> Result<AttentionGrads<Self>>;
    fn cuda_attention_top_keys(
        runner: &Runner,
        params: &AttentionParams,
        shape: AttentionShape,
        inputs: &AttentionInputs<'_, Self>,
        top: usize,
    ) -> Result<(Vec<Self::Acc>, Vec<i32>)>;
}

#[cfg(feature = "cuda")]
impl<E: CaseElement + crate::cuda::CudaElement> RunElement for E {
    fn cuda_selective(
        runner: &Runner,
        params: &SelectiveParams,
        shape: SelectiveShape,
        inputs: &SelectiveInputs<'_, E>,
    ) -> Result<(Vec<E>, Vec<E::Acc>)> {
        let device = runner.device()?;
        crate::scan::selective::cuda::selective_host(device, params, shape, inputs)
            .map(|r| (r.y, r.h_last))
    }
    fn cuda_selective_backward(
        runner: &Runner,
        params: &SelectiveParams,
        shape: SelectiveShape,
        inputs: &SelectiveInputs<'_, E>,
        dy: &[E],
    ) -> Result<SelectiveGrads<E>> {
        let device = runner.device()?;
        crate::scan::selective::cuda::selective_backward_host(device, params, shape, inputs, dy)
    }
    fn cuda_gla(
        runner: &Runner,
        params: &GlaParams,
        shape: GlaShape,
        inputs: &GlaInputs<'_, E>,
    ) -> Result<(Vec<E>, Vec<E::Acc>)> {
        let device = runner.device()?;
        crate::scan::gla::cuda::gla_host(device, params, shape, inputs).map(|r| (r.o, r.h_last))
    }
    fn cuda_gla_backward(
        runner: &Runner,
        params: &GlaParams,
        shape: GlaShape,
        inputs: &GlaInputs<'_, E>,
        d_o: &[E],
        dh_last: Option<&[E::Acc]>,
    ) -> Result<GlaGrads<E>> {
        let device = runner.device()?;
        crate::scan::gla::cuda::gla_backward_host(device, params, shape, inputs, d_o, dh_last)
    }
    fn cuda_scan_linear(
        runner: &Runner,
        numbers: Numbers,
        params: &ScanParams,
        shape: ScanShape,
        a: &[E],
        b: &[E],
        h0: Option<&[E]>,
    ) -> Result<Vec<E>> {
        let device = runner.device()?;
        match numbers {
            Numbers::Real => scan::cuda::linear_host(device, params, shape, a, b, h0),
            Numbers::Complex => scan::cuda::linear_complex_host(device, params, shape, a, b, h0),
        }
    }
    fn cuda_scan_linear_backward(
        runner: &Runner,
        numbers: Numbers,
        params: &ScanParams,
        shape: ScanShape,
        a: &[E],
        h: &[E],
        dh: &[E],
        h0: Option<&[E]>,
    ) -> Result<scan::LinearGrads<E>> {
        let device = runner.device()?;
        match numbers {
            Numbers::Real => scan::cuda::linear_backward_host(device, params, shape, a, h, dh, h0),
            Numbers::Complex => {
                scan::cuda::linear_complex_backward_host(device, params, shape, a, h, dh, h0)
            }
        }
    }
    fn cuda_attention_forward(
        runner: &Runner,
        params: &AttentionParams,
        shape: AttentionShape,
        inputs: &AttentionInputs<'_, E>,
    ) -> Result<(Vec<E>, Vec<E::Acc>)> {
        attention::cuda::forward_host(runner.device()?, params, shape, inputs).map(|r| (r.o, r.lse))
    }
    fn cuda_attention_backward(
        runner: &Runner,
        params: &AttentionParams,
        shape: AttentionShape,
        inputs: &AttentionInputs<'_, E>,
        o: &[E],
        d_o: &[E],
        lse: &[E::Acc],
    ) -> Result<AttentionGrads<E>> {
        attention::cuda::backward_host(runner.device()?, params, shape, inputs, o, d_o, lse)
    }
    fn cuda_attention_top_keys(
        runner: &Runner,
        params: &AttentionParams,
        shape: AttentionShape,
        inputs: &AttentionInputs<'_, E>,
        top: usize,
    ) -> Result<(Vec<E::Acc>, Vec<i32>)> {
        attention::cuda::top_keys_host(runner.device()?, params, shape, inputs, top)
            .map(|r| (r.weights, r.indices))
    }
}

#[cfg(not(feature = "cuda"))]
impl<E: CaseElement> RunElement for E {
    fn cuda_selective(
        _: &Runner,
        _: &SelectiveParams,
        _: SelectiveShape,
        _: &SelectiveInputs<'_, E>,
    ) -> Result<(Vec<E>, Vec<E::Acc>)> {
        Err(Error::NoDevice("this build has no `cuda` feature".into()))
    }
    fn cuda_selective_backward(
        _: &Runner,
        _: &SelectiveParams,
        _: SelectiveShape,
        _: &SelectiveInputs<'_, E>,
        _: &[E],
    ) -> Result<SelectiveGrads<E>> {
        Err(Error::NoDevice("this build has no `cuda` feature".into()))
    }
    fn cuda_gla(
        _: &Runner,
        _: &GlaParams,
        _: GlaShape,
        _: &GlaInputs<'_, E>,
    ) -> Result<(Vec<E>, Vec<E::Acc>)> {
        Err(Error::NoDevice("this build has no `cuda` feature".into()))
    }
    fn cuda_gla_backward(
        _: &Runner,
        _: &GlaParams,
        _: GlaShape,
        _: &GlaInputs<'_, E>,
        _: &[E],
        _: Option<&[E::Acc]>,
    ) -> Result<GlaGrads<E>> {
        Err(Error::NoDevice("this build has no `cuda` feature".into()))
    }
    fn cuda_scan_linear(
        _: &Runner,
        _: Numbers,
        _: &ScanParams,
        _: ScanShape,
        _: &[E],
        _: &[E],
        _: Option<&[E]>,
    ) -> Result<Vec<E>> {
        Err(Error::NoDevice("this build has no `cuda` feature".into()))
    }
    fn cuda_scan_linear_backward(
        _: &Runner,
        _: Numbers,
        _: &ScanParams,
        _: ScanShape,
        _: &[E],
        _: &[E],
        _: &[E],
        _: Option<&[E]>,
    ) -> Result<scan::LinearGrads<E>> {
        Err(Error::NoDevice("this build has no `cuda` feature".into()))
    }
    fn cuda_attention_forward(
        _: &Runner,
        _: &AttentionParams,
        _: AttentionShape,
        _: &AttentionInputs<'_, E>,
    ) -> Result<(Vec<E>, Vec<E::Acc>)> {
        Err(Error::NoDevice("this build has no `cuda` feature".into()))
    }
    fn cuda_attention_backward(
        _: &Runner,
        _: &AttentionParams,
        _: AttentionShape,
        _: &AttentionInputs<'_, E>,
        _: &[E],
        _: &[E],
        _: &[E::Acc],
    ) -> Result<AttentionGrads<E>> {
        Err(Error::NoDevice("this build has no `cuda` feature".into()))
    }
    fn cuda_attention_top_keys(
        _: &Runner,
        _: &AttentionParams,
        _: AttentionShape,
        _: &AttentionInputs<'_, E>,
        _: usize,
    ) -> Result<(Vec<E::Acc>, Vec<i32>)> {
        Err(Error::NoDevice("this build has no `cuda` feature".into()))
    }
}

fn typed<'c, E: CaseElement>(case: &'c Case, name: &str) -> Result<&'c [E]> {
    let t = case.input(name)?;
    E::unwrap(&t.data).ok_or_else(|| {
        case_err(
            &case.name,
            format!(
                "`in.{name}` is {}, expected {} like the other inputs",
                t.dtype_name(),
                E::DTYPE
            ),
        )
    })
}

fn optional<'c, E: CaseElement>(case: &'c Case, name: &str) -> Result<Option<&'c [E]>> {
    match case.inputs.get(name) {
        None => Ok(None),
        Some(_) => typed::<E>(case, name).map(Some),
    }
}

fn expect_shape(tensor: &str, got: &[usize], want: &[usize]) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(Error::shape(
            tensor,
            format!("{want:?}"),
            format!("{got:?}"),
        ))
    }
}

fn same_shape(case: &Case, name: &str, want: &[usize]) -> Result<()> {
    expect_shape(name, &case.input(name)?.shape, want)
}

/// An elementwise tolerance: |got - want| <= atol + rtol·|want|.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerance {
    /// The relative tolerance, scaled by |want|.
    pub rtol: f64,
    /// The absolute tolerance.
    pub atol: f64,
}

impl Tolerance {
    /// The defaults by dtype, as CASES.md gives them.
    pub fn default_for(dtype: DType) -> Tolerance {
        let (rtol, atol) = match dtype {
            DType::F64 => (1e-10, 1e-10),
            DType::F32 => (1e-4, 1e-5),
            DType::F16 | DType::BF16 => (2e-2, 2e-2),
        };
        Tolerance { rtol, atol }
    }

    /// Whether `got` equals `want` exactly (so equal infinities pass) or is within
    /// `atol + rtol·|want|` of it; a NaN on either side is never accepted.
    pub fn accepts(&self, got: f64, want: f64) -> bool {
        got == want || (got - want).abs() <= self.atol + self.rtol * want.abs()
    }
}

/// How one output compared.
#[derive(Clone, Debug)]
pub struct OutputCheck {
    /// The output's name (NAME of `out.NAME`).
    pub name: String,
    /// The largest |got - want| over the finite values compared (0 where none were); NaN for
    /// a missing output or a failed `best_alpha` choice.
    pub max_abs: f64,
    /// The largest |got - want| / |want| over the finite values compared with a nonzero
    /// `want` (0 where none were); NaN as for `max_abs`.
    pub max_rel: f64,
    /// Whether every value passed.
    pub passed: bool,
    /// Why it failed, when it did.
    pub problem: Option<String>,
}

/// Elementwise: |got - want| <= atol + rtol·|want|; NaN must match NaN, ±inf exactly.
pub fn compare_elementwise(name: &str, got: &Tensor, want: &Tensor, tol: Tolerance) -> OutputCheck {
    let mut check = OutputCheck {
        name: name.to_string(),
        max_abs: 0.0,
        max_rel: 0.0,
        passed: true,
        problem: None,
    };
    if got.shape != want.shape {
        check.passed = false;
        check.problem = Some(format!("shape {:?}, expected {:?}", got.shape, want.shape));
        return check;
    }
    let (g, w) = (got.to_f64(), want.to_f64());
    for (i, (&x, &y)) in g.iter().zip(&w).enumerate() {
        let ok = if y.is_nan() || x.is_nan() {
            x.is_nan() && y.is_nan()
        } else if y.is_infinite() || x.is_infinite() {
            x == y
        } else {
            let diff = (x - y).abs();
            check.max_abs = check.max_abs.max(diff);
            if y != 0.0 {
                check.max_rel = check.max_rel.max(diff / y.abs());
            }
            tol.accepts(x, y)
        };
        if !ok && check.passed {
            check.passed = false;
            check.problem = Some(format!("element {i}: got {x}, expected {y}"));
        }
    }
    check
}

/// Top-k by meaning: per row, the value lists must match as sorted lists (within the
/// tolerance), and every returned index must point at its value in the input
/// (`lookup(row, index)`, `None` when the index is out of range).
pub fn compare_topk(
    name: &str,
    got_values: &[f64],
    got_indices: &[i32],
    want_values: &[f64],
    k: usize,
    tol: Tolerance,
    lookup: impl Fn(usize, i32) -> Option<f64>,
) -> OutputCheck {
    let mut check = OutputCheck {
        name: name.to_string(),
        max_abs: 0.0,
        max_rel: 0.0,
        passed: true,
        problem: None,
    };
    let fail = |check: &mut OutputCheck, why: String| {
        if check.passed {
            check.passed = false;
            check.problem = Some(why);
        }
    };
    if k == 0
        || got_values.len() != want_values.len()
        || got_indices.len() != got_values.len()
        || !got_values.len().is_multiple_of(k)
    {
        fail(
            &mut check,
            format!(
                "{} values / {} indices, expected {} values",
                got_values.len(),
                got_indices.len(),
                want_values.len()
            ),
        );
        return check;
    }
    let close = |x: f64, y: f64| tol.accepts(x, y);
    for row in 0..got_values.len() / k {
        let span = row * k..(row + 1) * k;
        let mut g = got_values[span.clone()].to_vec();
        let mut w = want_values[span.clone()].to_vec();
        g.sort_by(|x, y| y.total_cmp(x));
        w.sort_by(|x, y| y.total_cmp(x));
        for (x, y) in g.iter().zip(&w) {
            let diff = (x - y).abs();
            if diff.is_finite() {
                check.max_abs = check.max_abs.max(diff);
                if *y != 0.0 {
                    check.max_rel = check.max_rel.max(diff / y.abs());
                }
            }
            if !close(*x, *y) {
                fail(
                    &mut check,
                    format!("row {row}: sorted values differ: got {x}, expected {y}"),
                );
            }
        }
        for j in span {
            let idx = got_indices[j];
            match lookup(row, idx) {
                Some(v) if close(got_values[j], v) => {}
                Some(v) => fail(
                    &mut check,
                    format!(
                        "row {row}: index {idx} holds {v}, returned value {}",
                        got_values[j]
                    ),
                ),
                None => fail(&mut check, format!("row {row}: index {idx} out of range")),
            }
        }
    }
    check
}

/// The outcome of one case file.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// Every output matched; the check of each.
    Passed(Vec<OutputCheck>),
    /// Why the case failed (the first failing output, or an error loading, running or
    /// saving), and the output checks (empty when it failed before comparing).
    Failed(String, Vec<OutputCheck>),
    /// Why the case did not run: no device, or a configuration the device's kernels do not
    /// take.
    Skipped(String),
}

/// A case's report line.
#[derive(Clone, Debug)]
pub struct Report {
    /// The case's file name.
    pub file: String,
    /// The case's op, or `"?"` when the file could not be loaded.
    pub op: String,
    /// The device the case ran on.
    pub device: DeviceKind,
    /// The name of the case's dtype (see [`Case::dtype`]), or `"?"` when unknown.
    pub dtype: String,
    /// How the case ended.
    pub outcome: Outcome,
}

impl Report {
    /// Whether the outcome is [`Outcome::Passed`].
    pub fn passed(&self) -> bool {
        matches!(self.outcome, Outcome::Passed(_))
    }

    /// One line: status, op, device, dtype, file, and max abs / rel error per output.
    pub fn line(&self) -> String {
        let (status, checks, why) = match &self.outcome {
            Outcome::Passed(c) => ("PASS", c.as_slice(), None),
            Outcome::Failed(why, c) => ("FAIL", c.as_slice(), Some(why.as_str())),
            Outcome::Skipped(why) => ("SKIP", &[][..], Some(why.as_str())),
        };
        let mut line = format!(
            "{status} {} {} {} {}",
            self.op,
            self.device.name(),
            self.dtype,
            self.file
        );
        for c in checks {
            line.push_str(&format!(
                " | {}: max_abs {:.3e} max_rel {:.3e}",
                c.name, c.max_abs, c.max_rel
            ));
        }
        if let Some(why) = why {
            line.push_str(&format!(" | {why}"));
        }
        line
    }
}

/// Loads, runs and compares one case file; `save` (a directory) receives the computed
/// outputs as `out.NAME` tensors in a file of the same name.
pub fn check_file(runner: &Runner, path: &Path, save: Option<&Path>) -> Report {
    let file = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let mut report = Report {
        file,
        op: "?".into(),
        device: runner.kind(),
        dtype: "?".into(),
        outcome: Outcome::Skipped(String::new()),
    };
    let case = match Case::load(path) {
        Ok(c) => c,
        Err(e) => {
            report.outcome = Outcome::Failed(e.to_string(), vec![]);
            return report;
        }
    };
    report.op = case.op.clone();
    report.dtype = case.dtype().map_or("?", DType::name).to_string();
    report.outcome = match runner.run(&case) {
        Err(Error::NoDevice(why)) => Outcome::Skipped(why),
        // a configuration the device's kernels do not take (e.g. a head dim past the CUDA
        // instantiations, f64 for the top-k family): skipped
        Err(Error::Unsupported(why)) => Outcome::Skipped(format!("unsupported: {why}")),
        Err(e) => Outcome::Failed(e.to_string(), vec![]),
        Ok(outputs) => {
            let mut saved = None;
            if let Some(dir) = save {
                saved = save_outputs(dir, &report.file, &outputs).err();
            }
            let checks = compare_case(&case, &outputs);
            match (checks.iter().find(|c| !c.passed), saved) {
                (_, Some(e)) => Outcome::Failed(format!("saving outputs: {e}"), checks),
                (Some(bad), None) => {
                    let why = format!("{}: {}", bad.name, bad.problem.clone().unwrap_or_default());
                    Outcome::Failed(why, checks)
                }
                (None, None) => Outcome::Passed(checks),
            }
        }
    };
    report
}

/// `best_alpha` of `ridge.cv` by meaning: a target whose chosen alpha differs from the
/// reference's passes only where the reference's mean CV scores of the two alphas differ by
/// less than the tolerance (a tie within rounding).
fn compare_best_alpha(case: &Case, got: &Tensor, want: &Tensor, tol: Tolerance) -> OutputCheck {
    let fail = |problem: String| OutputCheck {
        name: "best_alpha".into(),
        max_abs: f64::NAN,
        max_rel: f64::NAN,
        passed: false,
        problem: Some(problem),
    };
    let (g, w) = (got.to_f64(), want.to_f64());
    let scores = case.outputs.get("cv_scores").map(Tensor::to_f64);
    let alphas = case.inputs.get("alphas").map(Tensor::to_f64);
    let (Some(scores), Some(alphas)) = (scores, alphas) else {
        return fail("the case has no out.cv_scores or in.alphas to compare by".into());
    };
    if g.len() != w.len() || scores.len() != alphas.len() * w.len() {
        return fail(format!("{} values, expected {}", g.len(), w.len()));
    }
    let t = w.len();
    let index = |a: f64| alphas.iter().position(|x| *x == a);
    for (c, (ga, wa)) in g.iter().zip(&w).enumerate() {
        if ga == wa {
            continue;
        }
        let (Some(gi), Some(wi)) = (index(*ga), index(*wa)) else {
            return fail(format!(
                "target {c}: alpha {ga} is not one of the case's alphas"
            ));
        };
        let (sg, sw) = (scores[gi * t + c], scores[wi * t + c]);
        if (sg - sw).abs() > tol.atol + tol.rtol * sw.abs() {
            return fail(format!(
                "target {c}: chose alpha {ga} (mean score {sg}) where the reference chose {wa} ({sw})"
            ));
        }
    }
    OutputCheck {
        name: "best_alpha".into(),
        max_abs: 0.0,
        max_rel: 0.0,
        passed: true,
        problem: None,
    }
}

/// Compares computed outputs with every `out.NAME` of the case.
pub fn compare_case(case: &Case, got: &BTreeMap<String, Tensor>) -> Vec<OutputCheck> {
    let default = Tolerance::default_for(case.dtype().unwrap_or(DType::F32));
    let tol = Tolerance {
        rtol: case.rtol.unwrap_or(default.rtol),
        atol: case.atol.unwrap_or(default.atol),
    };
    if let Some(checks) = topk_ops::compare(case, got, tol) {
        return checks;
    }
    case.outputs
        .iter()
        .map(|(name, want)| match got.get(name) {
            Some(g) if case.op == "ridge.cv" && name == "best_alpha" => {
                compare_best_alpha(case, g, want, tol)
            }
            Some(g) => compare_elementwise(name, g, want, tol),
            None => OutputCheck {
                name: name.clone(),
                max_abs: f64::NAN,
                max_rel: f64::NAN,
                passed: false,
                problem: Some("the op produced no such output".into()),
            },
        })
        .collect()
}

/// Writes `outputs` to `dir/file` with tensors named `out.NAME`.
pub fn save_outputs(dir: &Path, file: &str, outputs: &BTreeMap<String, Tensor>) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let named: Vec<(String, &Tensor)> = outputs
        .iter()
        .map(|(k, v)| (format!("out.{k}"), v))
        .collect();
    safetensors::serialize_to_file(named, None, &dir.join(file))
        .map_err(|e| Error::Io(e.to_string()))
}

/// Every `.safetensors` file under the given files and folders, sorted.
pub fn collect_case_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(path)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                .collect();
            found.sort();
            files.extend(found);
        } else if path.is_file() {
            files.push(path.clone());
        } else {
            return Err(Error::Io(format!(
                "{}: no such file or folder",
                path.display()
            )));
        }
    }
    Ok(files)
}

/// `x [n, p]` and `y [n, t]` of a ridge case: (n, p, t).
fn ridge_design(case: &Case) -> Result<(usize, usize, usize)> {
    let x = case.input("x")?.shape.clone();
    let [n, p] = x[..] else {
        return Err(Error::shape("x", "rank 2 [n, p]", format!("{x:?}")));
    };
    let y = case.input("y")?.shape.clone();
    match y[..] {
        [yn, t] if yn == n => Ok((n, p, t)),
        _ => Err(Error::shape("y", format!("[{n}, t]"), format!("{y:?}"))),
    }
}

/// An I32 input's values.
fn index_input<'c>(case: &'c Case, name: &str) -> Result<&'c [i32]> {
    match &case.input(name)?.data {
        Data::I32(v) => Ok(v.as_slice()),
        _ => Err(case_err(
            &case.name,
            format!("`in.{name}` must be an index tensor"),
        )),
    }
}

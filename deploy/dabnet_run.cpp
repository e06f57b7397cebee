// Runs a `dabnet export -o model.pt2` package without Python: loads the dabnet op library (the
// package calls its kernels), loads the package with AOTIModelPackageLoader, reads a binary PPM
// (P6, 8-bit RGB), runs the model and writes the per-pixel class labels as a binary PGM (P5).
//
//   dabnet_run MODEL.pt2 OPS_LIBRARY.so INPUT.ppm OUTPUT.pgm
//
// OPS_LIBRARY.so is dabnet_kernels/_C*.so of the build that exported the package. Build: `make
// deploy` (see docs/deploy.md).
#include <dlfcn.h>

#include <ATen/ATen.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct Image {
  int64_t width = 0, height = 0;
  std::vector<uint8_t> rgb;  // height x width x 3
};

// The next header token of a PNM file, skipping whitespace and # comments.
std::string pnm_token(std::istream& in) {
  std::string tok;
  int c;
  while ((c = in.get()) != EOF) {
    if (c == '#') {
      while ((c = in.get()) != EOF && c != '\n') {
      }
    } else if (std::isspace(c)) {
      if (!tok.empty()) return tok;
    } else {
      tok.push_back(static_cast<char>(c));
    }
  }
  return tok;
}

Image read_ppm(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open image " + path);
  if (pnm_token(in) != "P6")
    throw std::runtime_error(path + " is not a binary PPM (P6) image");
  Image img;
  int64_t maxval = 0;
  try {
    img.width = std::stoll(pnm_token(in));
    img.height = std::stoll(pnm_token(in));
    maxval = std::stoll(pnm_token(in));
  } catch (const std::exception&) {
    throw std::runtime_error(path + ": malformed PPM header");
  }
  if (img.width < 1 || img.height < 1 || maxval != 255)
    throw std::runtime_error(path + ": expected an 8-bit PPM (maxval 255) of at least 1x1");
  img.rgb.resize(static_cast<size_t>(img.width * img.height * 3));
  in.read(reinterpret_cast<char*>(img.rgb.data()), static_cast<std::streamsize>(img.rgb.size()));
  if (in.gcount() != static_cast<std::streamsize>(img.rgb.size()))
    throw std::runtime_error(path + ": truncated pixel data");
  return img;
}

void write_pgm(const std::string& path, const at::Tensor& labels) {
  std::ofstream out(path, std::ios::binary);
  if (!out) throw std::runtime_error("cannot write " + path);
  out << "P5\n" << labels.size(1) << " " << labels.size(0) << "\n255\n";
  out.write(reinterpret_cast<const char*>(labels.data_ptr<uint8_t>()), labels.numel());
  if (!out) throw std::runtime_error("error writing " + path);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) {
    std::cerr << "usage: " << argv[0] << " MODEL.pt2 OPS_LIBRARY.so INPUT.ppm OUTPUT.pgm\n"
              << "  runs a `dabnet export` package on an 8-bit RGB PPM image and writes the\n"
              << "  per-pixel class labels as an 8-bit PGM\n";
    return 2;
  }
  const std::string package = argv[1], ops = argv[2], input = argv[3], output = argv[4];
  try {
    // RTLD_LAZY: the library's Python module entry point is never called here.
    if (!dlopen(ops.c_str(), RTLD_LAZY | RTLD_GLOBAL))
      throw std::runtime_error("cannot load the dabnet op library " + ops + ": " + dlerror());
    torch::inductor::AOTIModelPackageLoader loader(package);
    auto meta = loader.get_metadata();
    const std::string device = meta.count("device") ? meta["device"] : "cpu";
    Image img = read_ppm(input);
    const std::string size = std::to_string(img.height) + "x" + std::to_string(img.width);  // HxW
    const int64_t min_side = meta.count("min_side") ? std::stoll(meta["min_side"]) : 1;
    if (std::min(img.width, img.height) < min_side)
      throw std::runtime_error(input + " is " + size + "; the package takes at least " +
                               std::to_string(min_side) + "x" + std::to_string(min_side));
    long fixed_h = 0, fixed_w = 0;  // a --static package: metadata size "[H, W]"
    if (meta["dynamic"] == "false" &&
        std::sscanf(meta["size"].c_str(), "[%ld, %ld]", &fixed_h, &fixed_w) == 2 &&
        (img.height != fixed_h || img.width != fixed_w))
      throw std::runtime_error(input + " is " + size + "; the package was exported for " +
                               std::to_string(fixed_h) + "x" + std::to_string(fixed_w) +
                               " only (--static)");
    at::Tensor x = at::from_blob(img.rgb.data(), {1, img.height, img.width, 3}, at::kByte)
                       .permute({0, 3, 1, 2})
                       .to(at::Device(device), at::kFloat)
                       .contiguous();
    std::vector<at::Tensor> outputs = loader.run({x});
    if (outputs.size() != 1 || outputs[0].dim() != 4)
      throw std::runtime_error(package + " does not return one (N, classes, H, W) tensor");
    if (outputs[0].size(1) > 256)
      throw std::runtime_error("more than 256 classes do not fit an 8-bit PGM");
    at::Tensor labels = outputs[0].argmax(1)[0].to(at::kCPU, at::kByte).contiguous();
    write_pgm(output, labels);
    std::cout << "wrote " << output << " (" << size << ", "
              << outputs[0].size(1) << " classes, " << device << ")\n";
  } catch (const std::exception& e) {
    std::cerr << "dabnet_run: error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}

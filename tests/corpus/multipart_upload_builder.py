"""Build a multipart/form-data upload by hand in a bytearray (a metadata part and a file
part) and post it; the server says which parts it got."""
# ruff: noqa: F821  (`http` and `log` are provided by the sandbox)

import uuid

CRLF = b"\r\n"


class MultipartEncoder:
    def __init__(self, seed):
        self.boundary = "----corral" + uuid.uuid5(uuid.NAMESPACE_URL, seed).hex
        self.body = bytearray()
        self.parts = 0

    def add_field(self, name, value):
        self._part(f'form-data; name="{name}"', None, value.encode("utf-8"))

    def add_file(self, name, filename, content, content_type="text/plain"):
        self._part(f'form-data; name="{name}"; filename="{filename}"', content_type, content)

    def _part(self, disposition, content_type, data):
        self.body.extend(b"--" + self.boundary.encode() + CRLF)
        self.body.extend(b"Content-Disposition: " + disposition.encode() + CRLF)
        if content_type:
            self.body.extend(b"Content-Type: " + content_type.encode() + CRLF)
        self.body.extend(CRLF + bytes(data) + CRLF)
        self.parts += 1

    def finish(self):
        self.body.extend(b"--" + self.boundary.encode() + b"--" + CRLF)
        return self.body.decode("utf-8"), "multipart/form-data; boundary=" + self.boundary


def run(params, context):
    connection = context["connection"]
    encoder = MultipartEncoder(params["document_id"])
    encoder.add_field("title", params["title"])
    encoder.add_file("file", params["filename"], params["content"].encode("utf-8"))
    body, content_type = encoder.finish()
    answer = (
        http.post(
            connection["baseUrl"] + "/upload", data=body, headers={"Content-Type": content_type}
        )
        .raise_for_status()
        .json()
    )
    return {"parts": encoder.parts, "size": len(body), "received": answer["parts"]}
